"""What an example task provides to the CLI, the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Task:
    name: str
    model: torch.nn.Module
    batches: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (seed, batch_size) -> endless batches
    loss: Callable[[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]

    def train_step(self, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One optimizer step on ``batch``; returns the batch's loss (the same loop for every trainer)."""
        loss = self.loss(self.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()
