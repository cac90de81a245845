"""A peer's training state as a joiner copies it: captured under the state lock, checked, loaded.

The state holds the parameters, the local optimizer's state dict (its hyperparameters too, e.g.
a scheduled learning rate), the step counter and the round strategy's own state (the outer
optimizer's anchor and momentum in outer mode).  ``check`` runs before anything is loaded, so a
state that does not fit leaves the joiner as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _copied(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples in which every tensor is a detached CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _copied(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(value) for value in obj)
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


def capture(
    params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, local_step: int, strategy: Any, extra: dict
) -> dict[str, Any]:
    """Copies of everything a joiner needs (call it under the lock that guards the training step)."""
    return {
        "params": [p.detach().to("cpu", copy=True) for p in params],
        "optimizer": _copied(optimizer.state_dict()),
        "local_step": local_step,
        "strategy": _copied(strategy.state_dict()),
        "extra": extra,
    }


def check(
    state: dict[str, Any], params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, strategy: Any
) -> None:
    """Raise ValueError if a downloaded state cannot be loaded here."""
    theirs_params, theirs_optimizer, local_step = state.get("params"), state.get("optimizer"), state.get("local_step")
    if not isinstance(theirs_params, list) or len(theirs_params) != len(params):
        raise ValueError(f"expected a list of {len(params)} parameters, got {type(theirs_params).__name__}")
    for i, (ours, theirs) in enumerate(zip(params, theirs_params)):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape or theirs.dtype != ours.dtype:
            got = f"{tuple(theirs.shape)} {theirs.dtype}" if isinstance(theirs, torch.Tensor) else repr(theirs)
            raise ValueError(f"parameter {i} should be {tuple(ours.shape)} {ours.dtype}, got {got}")
    if not isinstance(local_step, int) or isinstance(local_step, bool) or local_step < 0:
        raise ValueError(f"local_step should be a non-negative int, got {local_step!r}")
    groups = theirs_optimizer.get("param_groups") if isinstance(theirs_optimizer, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("the optimizer state is not a torch.optim state_dict")
    theirs = [len(g.get("params", ())) for g in groups]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise ValueError(f"the optimizer's parameter groups hold {theirs} parameters, ours {ours}")
    strategy.check_state(state.get("strategy"))
    tensors = [*theirs_params, *_tensors(theirs_optimizer), *_tensors(state.get("strategy"))]
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise ValueError("the state holds NaN or Inf values")


@torch.no_grad()
def load(state: dict[str, Any], params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, strategy: Any) -> int:
    """Load a checked state; returns its step counter.  Where the strategy names other start
    parameters (outer mode: the anchor), the parameters start there."""
    optimizer.load_state_dict(state["optimizer"])  # checks the groups before it changes anything
    strategy.load_state_dict(state["strategy"])
    start = strategy.start_params()
    if start is None:
        for p, value in zip(params, state["params"]):
            p.copy_(value)
    else:
        offset = 0
        for p in params:
            p.copy_(start[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return state["local_step"]
