"""Delta rounds of sparse codecs: what a member keeps, what it shares, and where the dropped part goes."""

from __future__ import annotations

import torch

from gossiptrain.codecs import get_codec
from gossiptrain.rounds import RoundResult
from gossiptrain.wire import WireState

NUMEL = 4096
HALF = NUMEL // 2


def group_round(wires, params, round_id, combined=((0, NUMEL),)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One round of a group with equal weights, done as the exchange does it: each member encodes
    its values plus residual and keeps what the codec dropped in the residual; the mean of the
    decoded values goes through the codec's ``for_mean`` (top-k again), and where it is zero each
    member's residual takes back what it sent.  The result holds that mean on the ``combined``
    slices and the member's own values on the others, whose residual goes back to what it was.
    Returns the parameters after the round and what each member sent."""
    contributions = [wire.contribution(x, round_id) for wire, x in zip(wires, params)]
    residuals_before = [c.residual.clone() for c in contributions]
    targets, sent = [], []
    for c in contributions:
        targets.append(c.values + c.residual)
        decoded = c.codec.decode(c.codec.encode(targets[-1]), NUMEL)
        c.residual.copy_(targets[-1] - decoded)
        sent.append(decoded)
    exact_mean = torch.stack(sent).mean(0)
    mean_codec = contributions[0].codec.for_mean(len(wires), 1.0)
    mean = mean_codec.decode(mean_codec.encode(exact_mean), NUMEL)
    for c, target in zip(contributions, targets):
        if not c.codec.is_dense:
            c.residual[mean == 0] = target[mean == 0]
    after = []
    for wire, c, x, residual_before in zip(wires, contributions, params, residuals_before):
        averaged = c.values.clone()
        kept = torch.ones(NUMEL, dtype=torch.bool)
        for start, end in combined:
            averaged[start:end] = mean[start:end]
            kept[start:end] = False
        c.residual[kept] = residual_before[kept]
        result = RoundResult(round_id, "averaged", [str(i) for i in range(len(wires))], averaged, list(combined))
        after.append(wire.combine(result, x, c.mode))
    return after, sent


def members(count: int, codec: str) -> tuple[list[WireState], list[torch.Tensor]]:
    """Members that share a reference (as after a dense round), then each trained on its own."""
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    wires = [WireState(get_codec(codec), sync_every=1000) for _ in range(count)]
    for wire in wires:
        wire.reset(start)
    steps = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(i + 1)) for i in range(count)]
    return wires, [start + step for step in steps]


def test_a_delta_round_swaps_each_members_sent_part_for_the_group_mean_and_keeps_the_rest():
    wires, params = members(4, "topk:0.05")
    start = wires[0].reference.clone()
    after, sent = group_round(wires, params, round_id=1)
    exact_mean = torch.stack(sent).mean(0)
    returned = wires[0].reference != start  # the top 5% of the mean, of the up to 20% the members sent
    assert 0 < returned.sum() <= round(0.05 * NUMEL) < (exact_mean != 0).sum()
    mean = torch.where(returned, exact_mean, 0.0)
    for x, y, s, wire in zip(params, after, sent, wires):
        assert (s != 0).sum() <= 0.06 * NUMEL
        exchanged = torch.where(returned, s, 0.0)
        assert torch.allclose(y, x + mean - exchanged, atol=1e-5), "local progress that was not sent must be kept"
        assert torch.allclose(wire.reference, start + mean, atol=1e-6), "the reference moves by the group mean"
        assert torch.allclose(y - wire.reference, x - start - exchanged, atol=1e-5), "what was not exchanged stays"
    assert torch.allclose(sum(after), sum(params), atol=1e-3), "a round with equal weights moves no mass"


def test_repeated_delta_rounds_without_local_steps_bring_a_group_together():
    """Each round exchanges the top 5% of the mean, not all the members sent: the spread falls more
    slowly than with the whole union (up to 4x the bytes), but every ten rounds (dense rounds do the rest)."""
    wires, params = members(4, "topk:0.05+int8")
    spreads = [torch.stack(params).std(0).norm().item()]
    for round_id in range(1, 61):
        params, _ = group_round(wires, params, round_id)
        spreads.append(torch.stack(params).std(0).norm().item())
    every_ten = spreads[::10]
    assert all(b < 0.85 * a for a, b in zip(every_ten, every_ten[1:])), every_ten
    assert every_ten[-1] < 0.2 * every_ten[0], every_ten


def test_a_failed_slice_leaves_the_parameters_and_the_reference_as_they_were():
    wires, params = members(2, "topk:0.05")
    reference = wires[0].reference.clone()
    after, _ = group_round(wires, params, round_id=1, combined=[(0, HALF)])
    assert torch.equal(after[0][HALF:], params[0][HALF:])
    assert torch.equal(wires[0].reference[HALF:], reference[HALF:])
    assert not torch.equal(after[0][:HALF], params[0][:HALF])


def test_dense_codecs_average_parameters_every_round_unless_told_to_send_deltas():
    assert {WireState(get_codec("int8")).mode(r) for r in range(20)} == {"params"}
    assert {WireState(get_codec("none"), sync_every=10).mode(r) for r in range(20)} == {"params"}  # nothing to gain
    assert [WireState(get_codec("int8"), sync_every=10).mode(r) for r in (9, 10, 11)] == ["delta", "params", "delta"]
    assert WireState(get_codec("topk:0.01")).sync_every == 10


def test_int8_deltas_are_quantized_as_finely_as_they_are_small():
    """A delta round of int8 rounds the change since the shared reference, not the weights: its
    error scales with the local steps, and the members end at the reference plus the mean step."""
    wires = [WireState(get_codec("int8"), sync_every=10) for _ in range(4)]
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    for wire in wires:
        wire.reset(start)
    steps = [1e-3 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(i + 1)) for i in range(4)]
    after, _ = group_round(wires, [start + step for step in steps], round_id=1)
    exact = start + torch.stack(steps).mean(0)
    for y in after:
        assert (y - exact).abs().max() < 1e-3 * 4 / 127, "within an int8 step of the deltas, not of the weights"
    params_round, _ = group_round([WireState(get_codec("int8")) for _ in range(4)], [start + s for s in steps], 1)
    assert (params_round[0] - exact).abs().max() > 100 * (after[0] - exact).abs().max()
