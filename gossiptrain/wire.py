"""What crosses the wire in a round: the parameters, or their change since the last round.

Dense codecs (none, fp16, bf16, int8, int4) send the parameters themselves.  Quantizing weights
is harmless here because the owner of a shard encodes the mean once and every member, the owner
included, keeps the same decoded values: a group ends each round in exact agreement, and error
feedback carries each peer's rounding into its next contribution.

Sparse and low-rank codecs (topk, randomk, lowrank chains) would destroy raw weights, so they send
deltas, DiLoCo-style pseudo-gradients: ``delta = x - reference``, where the reference is this
peer's parameters as they stood after its last averaged round.  The group averages the deltas
(with error feedback: what topk drops is sent in later rounds) and each member moves to
``reference + mean(delta)``.  Members' references differ by what earlier rounds left behind
(other groups, values not yet sent), and a mean of deltas never pulls them together; so every
``sync_every``-th round is a dense round on the parameters with the chain's dense stage (``int8``
for ``topk:0.01+int8``), which does, and Moshpit's changing groups spread that agreement.  All
peers derive the kind of round from the round id, so a group always agrees on it.

A slice of a round that failed (its owner died, its data was refused) is as if the round did
not happen for it: the reference and the residual stay as they were, the local values are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gossiptrain.codecs import Codec
from gossiptrain.exchange import RoundResult


@dataclass
class Contribution:
    """What this peer hands to ``Peer.average`` for one round."""

    values: torch.Tensor
    residual: torch.Tensor
    mode: str  # "params" | "delta"
    codec: Codec


class WireState:
    """The reference and error-feedback residuals of one peer's averaged parameters.

    Args:
        codec: the codec of the run.
        sync_every: for sparse/low-rank codecs, one round in this many averages the parameters.
    """

    def __init__(self, codec: Codec, sync_every: int = 10):
        self.codec, self.sync_every = codec, sync_every
        self.reference: torch.Tensor | None = None
        self.residuals: dict[str, torch.Tensor] = {}

    def mode(self, round_id: int) -> str:
        return "params" if self.codec.is_dense or round_id % self.sync_every == 0 else "delta"

    def contribution(self, snapshot: torch.Tensor, round_id: int) -> Contribution:
        if self.reference is None or self.reference.numel() != snapshot.numel():
            self.reset(snapshot)
        mode = self.mode(round_id)
        residual = self.residuals.setdefault(mode, torch.zeros_like(snapshot))
        if mode == "params":
            return Contribution(snapshot, residual, mode, self.codec.dense_stage)
        return Contribution(snapshot - self.reference, residual, mode, self.codec)

    def combine(self, result: RoundResult, snapshot: torch.Tensor, mode: str) -> torch.Tensor:
        """The parameters after the round (``snapshot`` where it failed); moves the reference."""
        averaged = result.averaged if mode == "params" else self.reference + result.averaged
        for start, end in result.combined:
            self.reference[start:end] = averaged[start:end]
        return averaged

    def reset(self, params: torch.Tensor) -> None:
        """Start afresh from ``params`` (the first round, or after loading another peer's state)."""
        self.reference = params.clone()
        self.residuals.clear()
