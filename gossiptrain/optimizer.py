"""GossipOptimizer: ``attach`` shaped like an optimizer, for loops that step the object they train with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gossiptrain.attachment import Attachment, shutdown_all
from gossiptrain.params import AGREEMENT, model_schema

__all__ = ["AGREEMENT", "GossipOptimizer", "model_schema", "shutdown_all"]


class GossipOptimizer(Attachment):
    """An ``Attachment`` (see ``gossiptrain.attachment``) with ``step``, ``zero_grad``, ``param_groups``,
    ``state_dict`` and ``load_state_dict`` of the optimizer it holds, so that ``opt.step()`` trains
    with the swarm.  Everything else (joining, rounds, checkpoints, ``finish``) is the attachment's;
    the rounds run from the optimizer's own step hooks, so stepping ``opt.optimizer`` does the same.

    It is not a ``torch.optim.Optimizer``: give schedulers and frameworks the optimizer itself and
    use ``gossiptrain.attach``.  Options: see ``Attachment``.  After ``shutdown()`` (or the end of its
    ``with`` block), ``step()`` raises: create a new one to rejoin the swarm.
    """

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self._state_lock:
            self.optimizer.load_state_dict(state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if self.closed:
            raise RuntimeError(
                "this GossipOptimizer was shut down (end of its `with` block, shutdown() or an interrupt): "
                "create a new one to rejoin the swarm"
            )
        return self.optimizer.step(closure)
