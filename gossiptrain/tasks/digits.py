"""scikit-learn's handwritten digits (8x8 images, 1797 samples) with a small MLP."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from gossiptrain.tasks.base import Task


def _load(split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def digits_task(model_seed: int = 0, hidden: int = 128) -> Task:
    """The same test split and initial model on every peer; each peer's batches come from its own seed.

    ``batches(seed, batch_size, classes=None)``: given ``classes`` (digit labels), only the training samples
    of those classes (a peer's non-IID share of the data); ``evaluate`` always scores the whole test split.
    """
    x_train, y_train, x_test, y_test = _load()
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def batches(
        seed: int, batch_size: int, classes: Iterable[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        x, y = x_train, y_train
        if classes is not None:
            keep = torch.isin(y_train, torch.tensor(sorted(set(classes)), dtype=torch.long))
            if not keep.any():
                raise ValueError(f"no training sample of classes {sorted(set(classes))}: digits are 0 to 9")
            x, y = x_train[keep], y_train[keep]
        while True:
            for index in torch.randperm(len(x), generator=generator).split(batch_size):
                yield x[index], y[index]

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        logits = model(x_test)
        return {
            "loss": F.cross_entropy(logits, y_test).item(),
            "accuracy": (logits.argmax(1) == y_test).float().mean().item(),
        }

    return Task("digits", model, batches, loss, evaluate)
