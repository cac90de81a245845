"""What a training task provides to the CLI peer, the demo and the benchmarks: ``Task``, and ``load_task``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Task:
    """A model with its data, loss and evaluation: what ``gossiptrain peer --module pkg.mod:factory`` trains.

    ``factory()`` (no arguments) returns a Task; the example tasks (``--example digits|charlm``) are two such
    factories.  Every peer of a run must build a model of the same shapes (peers of another shape are refused);
    seed its initialisation so that every peer starts from the same parameters.

    Args:
        name: shown in logs.
        model: the ``torch.nn.Module`` to train; the CLI trains it with Adam (``--lr``).
        batches: ``batches(seed, batch_size)`` yields batches without end; ``seed`` differs between peers
            (``--seed``, default the process id), so that each peer sees its own order of the data.
        loss: ``loss(model, batch)``, a scalar tensor to call ``backward()`` on.
        evaluate: ``evaluate(model)``, a dict of floats with at least ``loss`` (``accuracy`` too, if it has
            one); the CLI prints it at the end and every ``--eval-every`` seconds.
    """

    name: str
    model: torch.nn.Module
    batches: Callable[[int, int], Iterator[Any]]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]

    def train_step(self, optimizer: torch.optim.Optimizer, batch: Any) -> float:
        """One optimizer step on ``batch``; returns the batch's loss (the same loop for every trainer)."""
        loss = self.loss(self.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()


def load_task(spec: str) -> Task:
    """The Task that ``factory()`` returns, for ``spec`` ``"package.module:factory"``.

    Raises:
        ValueError: ``spec`` is not of that form, the module cannot be imported or has no such factory, or the
            factory returned something other than a Task (the message says which).
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--module {spec!r} is not of the form package.module:factory, e.g. my_pkg.train:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for --module {spec!r}: {e}") from e
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no function {attribute!r} (from --module {spec!r})")
    task = factory()
    if not isinstance(task, Task):
        raise ValueError(
            f"{spec}() returned a {type(task).__name__}, not a gossiptrain.Task(name, model, batches, loss, evaluate)"
        )
    return task
