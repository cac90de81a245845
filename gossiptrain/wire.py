"""What crosses the wire in a round: the parameters, or their change since a shared reference.

Dense codecs (none, fp16, bf16, int8, int4, int2) send the parameters themselves.  Quantizing weights
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

Memory: a peer keeps only the state its codec needs, each a float32 vector of the model's size: the
reference where there are delta rounds (``sync_every > 1``), the rounding carried between params
rounds where the dense stage is lossy (``int8``, ``fp16``...).  ``none`` keeps neither.  ``allocate``
makes them when the peer attaches, so that a round does not; the vector of what a delta round's codec
dropped (``unsent``) lives for that round only.
"""

from __future__ import annotations

import torch

from gossiptrain.codecs import Codec
from gossiptrain.rounds import RoundResult
from gossiptrain.strategy import Contribution

SPARSE_SYNC_EVERY = 10  # sparse and low-rank codecs: one params round in this many, by default


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
    holds_unapplied_steps = False  # a round's weight is the samples since its snapshot only

    def __init__(self, codec: Codec, sync_every: int | None = None):
        if sync_every is None:
            sync_every = 1 if codec.is_dense else SPARSE_SYNC_EVERY
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {sync_every}")
        self.codec, self.sync_every = codec, 1 if codec.lossless else sync_every
        self.keeps_reference = self.sync_every > 1  # delta rounds: what they send is measured from it
        self.keeps_residual = not codec.dense_stage.lossless  # params rounds quantize: error feedback
        self.reference: torch.Tensor | None = None
        self.params_residual: torch.Tensor | None = None  # rounding carried between params rounds
        self.unsent: torch.Tensor | None = None  # the part of the round's delta the codec dropped
        self._reset_due = True  # the state starts afresh from the next snapshot
        self._folding = False  # the round in flight is a final round with the residual folded in

    def allocate(self, numel: int) -> None:
        """Make the state for ``numel`` values now (it is reset from the first snapshot, in place)."""
        if self.keeps_reference and (self.reference is None or self.reference.numel() != numel):
            self.reference = torch.zeros(numel)
        if self.keeps_residual and (self.params_residual is None or self.params_residual.numel() != numel):
            self.params_residual = torch.zeros(numel)

    def mode(self, round_id: int) -> str:
        return "params" if round_id % self.sync_every == 0 else "delta"

    def contribution(self, snapshot: torch.Tensor, round_id: int, mode: str | None = None) -> Contribution:
        """This round's values; ``mode`` overrides the round id's kind ("params", "delta" or "final")."""
        if self._reset_due or self._sized_for() != snapshot.numel():
            self.reset(snapshot)
        self._folding = mode == "final" and self.params_residual is not None
        if mode == "final":
            if self.params_residual is None:
                return Contribution(snapshot, None, "params", self.codec.dense_stage)
            # the residual is folded in; it is zeroed when the round is applied (``combine``), not now: a
            # checkpoint meanwhile keeps it, and a final round that fails keeps it too
            return Contribution(snapshot + self.params_residual, None, "params", self.codec.dense_stage)
        if (mode or self.mode(round_id)) == "params":
            return Contribution(snapshot, self.params_residual, "params", self.codec.dense_stage)
        if self.unsent is not None and self.unsent.numel() == snapshot.numel():
            self.unsent.zero_()  # a failed round's, not combined: reused rather than held twice
        else:
            self.unsent = None
            self.unsent = torch.zeros_like(snapshot)  # the exchange writes what it could not send here
        return Contribution(snapshot - self.reference, self.unsent, "delta", self.codec)

    def _sized_for(self) -> int | None:
        state = self.reference if self.keeps_reference else self.params_residual
        return None if state is None else state.numel()

    def combine(self, result: RoundResult, snapshot: torch.Tensor, mode: str) -> torch.Tensor:
        """The parameters after the round (``snapshot`` where it failed); moves the reference.  Formed in
        place in ``result.averaged``, which the round does not use again."""
        if mode == "params":
            if self._folding:  # a final round: the parameters now hold what the residual held
                self.params_residual.zero_()
                self._folding = False
            if self.reference is not None:
                for start, end in result.combined:
                    self.reference[start:end] = result.averaged[start:end]
            return result.averaged
        moved = result.averaged.add_(self.reference)
        for start, end in result.combined:
            self.reference[start:end] = moved[start:end]
        if self.unsent is not None:
            moved.add_(self.unsent)
        self.unsent = None
        return moved

    def reset(self, params: torch.Tensor) -> None:
        """Start afresh from ``params`` (the first round, or after loading another peer's state), in the
        state's own buffers where they have the size."""
        self.allocate(params.numel())
        if self.keeps_reference:
            self.reference.copy_(params)
        if self.keeps_residual:
            self.params_residual.zero_()
        self.unsent = None
        self._reset_due = False

    def state_dict(self, own: bool = False) -> dict:
        """Nothing travels to a joiner: its reference starts at the parameters it downloads.  This peer's
        own checkpoint (``own``) keeps its reference and the rounding carried between params rounds."""
        if not own or self._reset_due:
            return {}
        state = {"reference": self.reference, "params_residual": self.params_residual}
        return {key: value.clone() for key, value in state.items() if value is not None}

    def check_state(self, state: object) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"the strategy's state should be a dict, got {type(state).__name__}")
        kept = [state[key] for key in ("reference", "params_residual") if key in state]  # a checkpoint's
        if kept and (
            not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 1 for t in kept)
            or len({t.numel() for t in kept}) > 1
        ):
            raise ValueError("the strategy's reference and params_residual should be float32 tensors of one size")

    def load_state_dict(self, state: dict) -> None:
        """A joiner's reference is reset from the downloaded parameters at its first round; a checkpoint's
        reference and residual are restored."""
        self.unsent, self._reset_due = None, True
        if "reference" in state or "params_residual" in state:
            for key in ("reference", "params_residual"):
                if key in state:
                    setattr(self, key, state[key].clone())
            needed = [self.reference] * self.keeps_reference + [self.params_residual] * self.keeps_residual
            self._reset_due = any(t is None for t in needed)

    def start_params(self) -> None:
        """A joiner starts from the parameters it downloaded."""
        return None
