"""A peer's training state as a joiner or a restarted peer copies it: captured under the state lock, checked, loaded.

The state holds the parameters, the local optimizer's state dict (its hyperparameters too, e.g.
a scheduled learning rate), the scheduler's state where there is one, the step counter and the
round strategy's own state (the outer optimizer's anchor and momentum in outer mode).  A
checkpoint (``own=True``) holds this peer's private part of the strategy's state too (its
reference and residuals), and the attachment adds the model's buffers and its round counters.
``check`` runs before anything is loaded, so a state that does not fit leaves the peer as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gossiptrain.strategy import RoundStrategy


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
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    local_step: int,
    strategy: RoundStrategy,
    extra: dict,
    scheduler: Any | None = None,
    own: bool = False,
    copy: bool = True,
) -> dict[str, Any]:
    """Copies of everything a joiner needs, or with ``own`` this peer's checkpoint (call it under the
    lock that guards the training step).  ``copy=False`` returns the live tensors instead, for a state
    server that reads them a chunk at a time under that lock (``gossiptrain.state.StateStream``)."""
    copied = _copied if copy else (lambda obj: obj)
    state = {
        "params": [copied(p.detach()) for p in params],
        "optimizer": copied(optimizer.state_dict()),
        "local_step": local_step,
        "strategy": copied(strategy.state_dict(own=own)),
        "extra": extra,
    }
    if scheduler is not None:
        state["scheduler"] = copied(scheduler.state_dict())
    return state


def check(
    state: dict[str, Any], params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, strategy: RoundStrategy
) -> None:
    """Raise ValueError if a downloaded state (or a checkpoint) cannot be loaded here."""
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
    if not isinstance(state.get("scheduler", {}), dict):
        raise ValueError(f"the scheduler's state should be a dict, got {type(state['scheduler']).__name__}")
    tensors = [*theirs_params, *_tensors(theirs_optimizer), *_tensors(state.get("strategy"))]
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise ValueError("the state holds NaN or Inf values")


@torch.no_grad()
def load(
    state: dict[str, Any],
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    strategy: RoundStrategy,
    scheduler: Any | None = None,
    own: bool = False,
) -> int:
    """Load a checked state; returns its step counter.  The scheduler's state is loaded where both the
    state and this peer have one.  Where the strategy names other start parameters (outer mode: the
    anchor), a joiner's parameters start there; a checkpoint (``own``) restores them as they were."""
    optimizer.load_state_dict(state["optimizer"])  # checks the groups before it changes anything
    strategy.load_state_dict(state["strategy"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    start = None if own else strategy.start_params()
    if start is None:
        for p, value in zip(params, state["params"]):
            p.copy_(value)
    else:
        offset = 0
        for p in params:
            p.copy_(start[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return state["local_step"]


def resume_source(own_step: int, swarm_step: int | None) -> str:
    """Where a peer restarted from a checkpoint at ``own_step`` goes on from: ``"swarm"`` if the swarm is
    ahead of it (a live peer took more steps), ``"checkpoint"`` otherwise (also with no live peer)."""
    return "swarm" if swarm_step is not None and swarm_step > own_step else "checkpoint"


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a peer killed mid-write leaves the previous file whole."""
    temporary = f"{os.fspath(path)}.tmp-{os.getpid()}"
    torch.save(state, temporary)
    os.replace(temporary, path)


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save`` (tensors and plain containers only: ``weights_only``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a gossiptrain checkpoint (it holds a {type(state).__name__})")
    return state
