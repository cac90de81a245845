"""The outer-optimizer strategy: DiLoCo's outer step on pseudo-gradients gossiped in dynamic groups.

Each peer keeps an *anchor*, the parameters at its last outer step, and trains from it with its
own (inner) optimizer.  At every outer round it sends its pseudo-gradient ``anchor - params``
(what its inner steps moved since the anchor) to the round's group, sets the anchor's ``.grad``
to the group's weighted mean and lets the user's outer optimizer, an ordinary
``torch.optim.Optimizer`` over the anchor, take one step (Douillard et al., "DiLoCo", 2023;
torchft's ``DiLoCo`` has the same shape).  The parameters then continue from the new anchor.

Overlap: the round runs in the background while the inner steps go on (``GossipOptimizer``),
so its result arrives a few steps late; the parameters become ``new anchor + (steps taken since
the snapshot)``, so those steps are kept and enter the next pseudo-gradient, never counted twice.

Compression: the pseudo-gradient goes through the run's codec with error feedback, but what a
codec drops (quantization error, the coordinates top-k left out or the group's top-k mean did not
return) is not reset to the anchor and kept in a hidden buffer, as SparseLoCo does: it stays in
the parameters, ``params = new anchor - dropped``, so the next pseudo-gradient holds it again and
the model keeps that local progress meanwhile (CHOCO-SGD's rule, as ``gossiptrain.wire`` does for
parameter gossip).  Reset to the anchor instead, a sparse chain (top-k) loses most of a short
run's local progress (``benchmarks/README.md``).

Gossip, not all-reduce: a round needs only its group, and members of a group apply the same
decoded mean, so peers that shared an anchor still share it.  Groups that average different
subsets move their anchors apart; every ``anchor_sync_every``-th round is therefore an
*anchor-sync* round that averages the parameters themselves (with the codec's dense stage) and
sets the anchor to that mean (an outer step of learning rate 1 without momentum, which the
outer optimizer does not see), and Moshpit's changing groups spread the agreement.  A joiner
downloads the anchor and the outer optimizer's state and starts its inner steps from the anchor.

Failure semantics: on a slice of the model whose owner failed (it died, its data was refused),
the round did not happen: the anchor, the outer optimizer's state and the parameters stay as
they were there, and that part of the pseudo-gradient is sent again next round.  A round in
which this peer was alone is an outer step with its own pseudo-gradient (DiLoCo with one worker),
so a lone peer still trains from a moving anchor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from gossiptrain.codecs import Codec
from gossiptrain.exchange import uncovered
from gossiptrain.rounds import RoundResult
from gossiptrain.strategy import Contribution

OuterFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
ANCHOR_SYNC_EVERY = 5  # one outer round in this many averages the parameters and resets the anchor


class OuterStrategy:
    """The anchor, the outer optimizer and the error feedback of one peer in outer mode.

    Args:
        params: the model's parameters; the anchor starts as a float32 copy of them, flattened.
        outer_optimizer: builds the outer optimizer from the anchor's parameters, e.g.
            ``lambda params: torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)``.
        codec: the run's codec for pseudo-gradients (sparse chains too).
        anchor_sync_every: one round in this many is an anchor-sync round (see the module).
    """

    steps_alone = True  # a round alone is an outer step on the own pseudo-gradient (see the module)
    holds_unapplied_steps = True  # a failed round leaves the anchor: the next pseudo-gradient spans both

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        outer_optimizer: OuterFactory,
        codec: Codec,
        anchor_sync_every: int = ANCHOR_SYNC_EVERY,
    ):
        if anchor_sync_every < 1:
            raise ValueError(f"anchor_sync_every must be at least 1, got {anchor_sync_every}")
        self.shapes, self.codec, self.anchor_sync_every = [p.shape for p in params], codec, anchor_sync_every
        self.numel = sum(s.numel() for s in self.shapes)
        self.anchor = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params])
        self.grad = torch.zeros(self.numel)
        self.anchor_params = self._views(self.anchor, requires_grad=True)
        for param, grad in zip(self.anchor_params, self._views(self.grad)):
            param.grad = grad
        self.outer = outer_optimizer(self.anchor_params)
        if not isinstance(self.outer, torch.optim.Optimizer):
            raise TypeError(f"outer_optimizer must build a torch.optim.Optimizer, got {type(self.outer).__name__}")
        self.residual = torch.zeros(self.numel)  # what the exchange's codec dropped, folded into the parameters
        self.step_norm: float | None = None  # L2 norm of the anchor's move in the last outer step (outer rounds)

    def _views(self, flat: torch.Tensor, requires_grad: bool = False) -> list[torch.Tensor]:
        views, offset = [], 0
        for shape in self.shapes:
            view = flat[offset : offset + shape.numel()].view(shape)
            views.append(torch.nn.Parameter(view, requires_grad=True) if requires_grad else view)
            offset += shape.numel()
        return views

    def mode(self, round_id: int) -> str:
        return "params" if round_id % self.anchor_sync_every == 0 else "outer"

    def contribution(self, snapshot: torch.Tensor, round_id: int, mode: str | None = None) -> Contribution:
        """This round's values: the pseudo-gradient, or the parameters in anchor-sync and final rounds."""
        kind = mode or self.mode(round_id)
        if kind in ("params", "final"):
            return Contribution(snapshot, None, "params", self.codec.dense_stage)
        return Contribution(self.anchor - snapshot, self.residual, "outer", self.codec)

    def combine(self, result: RoundResult, snapshot: torch.Tensor, mode: str) -> torch.Tensor:
        """The parameters after the round (``snapshot`` where it failed); moves the anchor."""
        alone = result.status == "alone"
        held = [(0, self.numel)] if alone else result.combined
        # formed in place in result.averaged (the round does not use it again), which holds the mean
        # where it was held and this peer's own values elsewhere
        moved = result.averaged
        if mode == "params":
            for start, end in held:
                self.anchor[start:end] = moved[start:end]
            return moved
        if alone:  # our own pseudo-gradient
            torch.sub(self.anchor, snapshot, out=moved)
        self.outer_step(moved, held, scratch=moved)  # moved is overwritten below, on held and elsewhere
        for start, end in held:  # what the codec dropped stays in the parameters, not in the residual
            torch.sub(self.anchor[start:end], self.residual[start:end], out=moved[start:end])
            self.residual[start:end] = 0.0
        for start, end in uncovered(held, self.numel):
            moved[start:end] = snapshot[start:end]
        return moved

    @torch.no_grad()
    def outer_step(self, mean: torch.Tensor, held: list[tuple[int, int]], scratch: torch.Tensor | None = None) -> None:
        """One step of the outer optimizer with ``mean`` as the anchor's gradient, on ``held`` only:
        elsewhere the gradient is zero, and the anchor and the optimizer's state are put back as
        they were after the step (momentum would move them even without a gradient).  With a
        ``scratch`` vector (``mean`` itself may be it: it is read first), the norm of the anchor's
        move is measured in it and kept in ``step_norm``; without one, ``step_norm`` is None."""
        keep = torch.ones(self.numel, dtype=torch.bool)
        for start, end in held:
            keep[start:end] = False
        saved = [[t.clone() for t in self._tensors_of(param)] for param in self.anchor_params] if keep.any() else []
        self.grad.copy_(mean).masked_fill_(keep, 0.0)
        if scratch is not None:
            scratch.copy_(self.anchor)
        self.outer.step()
        self.grad.zero_()
        offset = 0
        for param, before in zip(self.anchor_params, saved):
            here, offset = keep[offset : offset + param.numel()], offset + param.numel()
            for now, was in zip(self._tensors_of(param), before):  # state created by this step started at 0
                now.view(-1)[here] = was.view(-1)[here]
        self.step_norm = None if scratch is None else float(scratch.sub_(self.anchor).norm())

    def _tensors_of(self, param: torch.nn.Parameter) -> list[torch.Tensor]:
        """The anchor's values of ``param`` and the outer optimizer's state of its shape (momentum...)."""
        state = self.outer.state.get(param, {})
        return [param.data, *(t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == param.shape)]

    def state_dict(self, own: bool = False) -> dict[str, Any]:
        """What a joiner needs: the anchor and the outer optimizer's state; with ``own`` (this peer's
        checkpoint) also the residual, this peer's own unsent progress.  The live tensors, not copies
        (``training_state.capture`` copies them where it must)."""
        state = {"anchor": self.anchor, "outer_optimizer": self.outer.state_dict()}
        if own:
            state["residual"] = self.residual
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state["outer_optimizer"])
        self.anchor.copy_(state["anchor"])
        if "residual" in state:
            self.residual.copy_(state["residual"])
        else:
            self.residual.zero_()

    def check_state(self, state: Any) -> None:
        """Raise ValueError if ``state`` (from another peer) cannot be loaded here."""
        if not isinstance(state, dict):
            raise ValueError(f"the outer state should be a dict, got {type(state).__name__}")
        for key in ("anchor", "residual") if "residual" in state else ("anchor",):
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or value.shape != (self.numel,) or value.dtype != torch.float32:
                raise ValueError(f"the outer state's {key} should be {self.numel} float32 values")
        groups = (
            state["outer_optimizer"].get("param_groups") if isinstance(state.get("outer_optimizer"), dict) else None
        )
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in self.outer.param_groups
        ]:
            raise ValueError("the outer optimizer's state does not match this peer's outer optimizer")

    def start_params(self) -> torch.Tensor:
        """Where a joiner's inner steps start: the anchor."""
        return self.anchor
