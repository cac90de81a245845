"""What crosses the wire in a round: the parameters, or their change since a shared reference.

Dense codecs (none, fp16, bf16, int8, int4) send the parameters themselves.  Quantizing weights
is harmless here because the owner of a shard encodes the mean once and every member, the owner
included, keeps the same decoded values: a group ends each round in exact agreement, and error
feedback carries each peer's rounding into its next contribution, and the owner's rounding of the
mean into the owner's next one.  Given a ``sync_every``, a lossy dense codec sends deltas like a
sparse chain (below) in the rounds between, where its quantization step is that of the change
since the reference, not of the weights.

Sparse and low-rank codecs (topk, randomk, lowrank chains) would destroy raw weights, so they send
``delta = x - reference``, where the reference is a public copy of the parameters in the sense of
CHOCO-SGD: it moves only by what the group averaged, so members that share it keep sharing it.
Each member replaces the part of its delta that the codec sent by the group's mean of the sent
parts and keeps the rest: ``x <- x + mean(sent) - sent``, ``reference <- reference + mean(sent)``.
The owner of a shard sends back only the top-k of that mean, as many values as one contribution
holds (the global top-k of gTop-k SGD, Shi et al., ICDCS 2019): a mean of g sparse contributions
would otherwise be up to g times denser than each, and those replies were most of a round's bytes.
Where the returned mean is zero nothing was exchanged, and each member keeps what it sent there
(``x`` unchanged, ``reference`` unchanged), so the group's sum of parameters stays what it was.
What the codec or the mean dropped thus stays in ``x - reference`` and is sent in later rounds
(error feedback without a hidden buffer), and the model keeps its local progress meanwhile instead
of waiting for every coordinate to be sent.  Members' references differ by what earlier rounds in
other groups left behind, and a mean of deltas never pulls them together; so every
``sync_every``-th round is a dense round on the parameters with the chain's dense stage (``int8``
for ``topk:0.01+int8``), which does, and Moshpit's changing groups spread that agreement.  All
peers derive the kind of round from the round id, and peers group only with peers of the same
kind (``Peer.average``), so a group always agrees on it; finishing peers average their parameters
in any round (``GossipOptimizer.finish``) and meet the others that finish.

A final round ("final") sends the parameters with the error feedback folded in and keeps no new
residual: peers that agree after one stay in agreement through any later final round, however
the finishing peers split.  (With error feedback, each extra round would move its group by the
mean of its residuals, up to a quantization step, away from the peers that had already left.)

A slice of a round that failed (its owner died, its data was refused) is as if the round did
not happen for it: the reference and the residual stay as they were, the local values are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gossiptrain.codecs import Codec
from gossiptrain.exchange import RoundResult

SPARSE_SYNC_EVERY = 10  # sparse and low-rank codecs: one params round in this many, by default


@dataclass
class Contribution:
    """What this peer hands to ``Peer.average`` for one round."""

    values: torch.Tensor
    residual: torch.Tensor | None
    mode: str  # "params" | "delta"
    codec: Codec


class WireState:
    """The reference and the error feedback of one peer's averaged parameters.

    Args:
        codec: the codec of the run.
        sync_every: one round in this many averages the parameters, the others send deltas.  For
            sparse/low-rank codecs None means 10; for dense codecs None means every round (params
            only), and a number makes a lossy one (int8, fp16, ...) quantize deltas in between,
            whose steps are as fine as the deltas are small.
    """

    steps_alone = False  # a round alone changes nothing

    def __init__(self, codec: Codec, sync_every: int | None = None):
        if sync_every is None:
            sync_every = 1 if codec.is_dense else SPARSE_SYNC_EVERY
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {sync_every}")
        self.codec, self.sync_every = codec, 1 if codec.lossless else sync_every
        self.reference: torch.Tensor | None = None
        self.params_residual: torch.Tensor | None = None  # rounding carried between params rounds
        self.unsent: torch.Tensor | None = None  # the part of the round's delta the codec dropped

    def mode(self, round_id: int) -> str:
        return "params" if round_id % self.sync_every == 0 else "delta"

    def contribution(self, snapshot: torch.Tensor, round_id: int, mode: str | None = None) -> Contribution:
        """This round's values; ``mode`` overrides the round id's kind ("params", "delta" or "final")."""
        if self.reference is None or self.reference.numel() != snapshot.numel():
            self.reset(snapshot)
        if mode == "final":
            values = snapshot + self.params_residual
            self.params_residual.zero_()
            return Contribution(values, None, "params", self.codec.dense_stage)
        if (mode or self.mode(round_id)) == "params":
            return Contribution(snapshot, self.params_residual, "params", self.codec.dense_stage)
        self.unsent = torch.zeros_like(snapshot)  # the exchange writes what it could not send here
        return Contribution(snapshot - self.reference, self.unsent, "delta", self.codec)

    def combine(self, result: RoundResult, snapshot: torch.Tensor, mode: str) -> torch.Tensor:
        """The parameters after the round (``snapshot`` where it failed); moves the reference."""
        moved = result.averaged if mode == "params" else self.reference + result.averaged
        for start, end in result.combined:
            self.reference[start:end] = moved[start:end]
        return moved if mode == "params" else moved + self.unsent

    def reset(self, params: torch.Tensor) -> None:
        """Start afresh from ``params`` (the first round, or after loading another peer's state)."""
        self.reference = params.clone()
        self.params_residual = torch.zeros_like(params)
        self.unsent = None

    def state_dict(self, own: bool = False) -> dict:
        """Nothing travels to a joiner: its reference starts at the parameters it downloads.  This peer's
        own checkpoint (``own``) keeps its reference and the rounding carried between params rounds."""
        if not own or self.reference is None:
            return {}
        return {"reference": self.reference.clone(), "params_residual": self.params_residual.clone()}

    def check_state(self, state: object) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"the strategy's state should be a dict, got {type(state).__name__}")
        if "reference" in state or "params_residual" in state:  # a checkpoint's: both, of the same size
            reference, residual = state.get("reference"), state.get("params_residual")
            tensors = isinstance(reference, torch.Tensor) and isinstance(residual, torch.Tensor)
            if not tensors or reference.dtype != torch.float32 or reference.shape != residual.shape:
                raise ValueError("the strategy's reference and params_residual should be float32 tensors of one size")

    def load_state_dict(self, state: dict) -> None:
        """A joiner's reference is reset from the downloaded parameters at its first round; a checkpoint's
        reference and residual are restored."""
        self.reference, self.unsent = None, None
        if "reference" in state:
            self.reference, self.params_residual = state["reference"].clone(), state["params_residual"].clone()

    def start_params(self) -> None:
        """A joiner starts from the parameters it downloaded."""
        return None
