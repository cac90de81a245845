"""What a round strategy is: the contract between ``Attachment`` and the ways of averaging a model.

Two strategies implement it: parameter gossip (``wire.WireState``: rounds average the parameters, or deltas
of them, with a codec's error feedback) and the outer mode (``outer.OuterStrategy``: rounds average
pseudo-gradients, and an outer optimizer steps an anchor).  ``Attachment`` asks the strategy what a round
contributes (``contribution``), hands it the round's result to combine (``combine``), and saves, checks and
loads its state with checkpoints and joiners' downloads (``training_state``).  The round itself
(``Peer.average``) sees only the contribution: flat values, a residual, a mode label and a codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gossiptrain.codecs import Codec

if TYPE_CHECKING:
    from gossiptrain.rounds import RoundResult


@dataclass
class Contribution:
    """What this peer hands to ``Peer.average`` for one round."""

    values: torch.Tensor
    residual: torch.Tensor | None
    mode: str  # the round's label: "params", "delta", "final" or "outer"; peers group with their own label
    codec: Codec


class RoundStrategy(Protocol):
    """What ``Attachment`` needs of a way of averaging a model (see the module docstring)."""

    steps_alone: bool  # whether a round that found no partner still changes the model (an outer step)
    # whether a round's values hold all local progress since the last round applied (pseudo-gradients from
    # the anchor): a round that failed leaves its steps in the next one's values, and its weight then counts them
    holds_unapplied_steps: bool

    def contribution(self, snapshot: torch.Tensor, round_id: int, mode: str | None = None) -> Contribution:
        """What this peer sends in round ``round_id``, from the flat ``snapshot`` of its parameters;
        ``mode="final"`` asks for a round of the parameters themselves (``Attachment.finish``)."""

    def combine(self, result: RoundResult, snapshot: torch.Tensor, mode: str) -> torch.Tensor:
        """The flat parameters the round leads to (its state moved with them), from its ``result``."""

    def state_dict(self, own: bool = False) -> dict[str, Any]:
        """What travels to a joiner (``own=False``) or into this peer's own checkpoint."""

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded here (before anything is loaded)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def start_params(self) -> torch.Tensor | None:
        """The parameters a joiner starts from, if not the downloaded ones (the outer mode's anchor)."""
