"""A byte-level causal transformer language model of the Python standard library's own sources.

The corpus is the text every Python install ships: the ``*.py`` files directly in the standard
library's directory (``os.path.dirname(os.__file__)``; no sub-packages, so no site-packages and
no test suite), read as bytes in sorted file-name order and capped at ``corpus_bytes``.  The
vocabulary is the 256 byte values, so tokenisation needs no agreement between peers.  The last
``validation_fraction`` of the corpus is held out; ``evaluate`` scores a fixed set of windows of
it.  Peers on the same Python version read the same corpus; peers on different versions read
different text but train the same model (same shapes, same initial parameters).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gossiptrain.tasks.base import Task

VOCAB = 256


@lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 4 * 2**20) -> bytes:
    """The standard library's top-level ``*.py`` files, concatenated in sorted order, at most ``max_bytes``."""
    parts, size = [], 0
    for path in sorted(Path(os.path.dirname(os.__file__)).glob("*.py")):
        if size >= max_bytes:
            break
        text = path.read_bytes() + b"\n"
        parts.append(text)
        size += len(text)
    corpus = b"".join(parts)[:max_bytes]
    if len(corpus) < 2**16:
        raise RuntimeError(f"found only {len(corpus)} bytes of *.py files in {os.path.dirname(os.__file__)}")
    return corpus


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """Byte embeddings + learned positions, ``n_layers`` causal blocks, a linear head over 256 bytes."""

    def __init__(self, context: int, d_model: int, n_heads: int, n_layers: int, d_ff: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.context = context
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.Sequential(*[_Block(d_model, n_heads, d_ff) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        # GPT-2 initialisation: small normal weights, residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, time, 256)`` of the next byte at every position of ``tokens`` ``(batch, time)``."""
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} bytes is longer than the model's context of {self.context}")
        return self.head(self.ln(self.blocks(self.embed(tokens) + self.position[:t])))


def charlm_task(
    model_seed: int = 0,
    context: int = 64,
    d_model: int = 192,
    n_heads: int = 6,
    n_layers: int = 2,
    d_ff: int = 768,
    corpus_bytes: int = 4 * 2**20,
    validation_fraction: float = 0.05,
    validation_windows: int = 256,
) -> Task:
    """The same corpus split, validation windows and initial model on every peer; batches come from each peer's seed.

    With the defaults: about 1.0M parameters and a context of 64 bytes, small enough to train on a CPU.
    ``evaluate`` returns the mean next-byte cross-entropy (``loss``, nats), ``bits_per_byte`` and next-byte
    ``accuracy`` over ``validation_windows`` evenly spaced windows of the held-out tail.
    ``batches(seed, batch_size, part=None)``: given ``part=(i, n)``, windows of the ``i``-th of ``n`` equal
    contiguous parts of the training text only (a peer's non-IID share of the data).
    """
    data = torch.frombuffer(bytearray(stdlib_corpus(corpus_bytes)), dtype=torch.uint8).long()
    split = int(len(data) * (1 - validation_fraction))
    train, valid = data[:split], data[split:]
    span = context + 1  # inputs and the byte after each of them
    starts = torch.linspace(0, len(valid) - span, validation_windows).long()
    valid_windows = valid[starts[:, None] + torch.arange(span)]

    with torch.random.fork_rng():
        torch.manual_seed(model_seed)
        model = ByteTransformer(context, d_model, n_heads, n_layers, d_ff)

    def batches(
        seed: int, batch_size: int, part: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(span)
        low, high = 0, len(train)
        if part is not None:  # the i-th of n contiguous parts of the training text
            i, n = part
            if not 0 <= i < n or len(train) // n <= span:
                raise ValueError(f"part {part}: need 0 <= i < n and parts longer than {span} bytes")
            low, high = len(train) * i // n, len(train) * (i + 1) // n
        while True:
            starts = low + torch.randint(0, high - low - span, (batch_size, 1), generator=generator)
            windows = train[starts + offsets]
            yield windows[:, :-1], windows[:, 1:]

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        total, correct = 0.0, 0
        for chunk in valid_windows.split(64):
            logits = model(chunk[:, :-1]).reshape(-1, VOCAB)
            targets = chunk[:, 1:].reshape(-1)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(1) == targets).sum())
        count = valid_windows[:, 1:].numel()
        return {"loss": total / count, "bits_per_byte": total / count / math.log(2), "accuracy": correct / count}

    return Task("charlm", model, batches, loss, evaluate)
