"""Codecs: stated error bounds, error feedback, chains, sizes, and refusal of malformed payloads."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from gossiptrain.codecs import BLOCK, CodecError, ErrorFeedback, get_codec

DENSE = ["none", "fp16", "bf16", "int8", "int4", "int2"]
REDUCED = ["topk:0.01", "topk:0.3", "randomk:0.05", "lowrank:4", "topk:0.01+int8", "randomk:0.1+fp16", "lowrank:2+int4"]
SPECS = DENSE + REDUCED
PART = 2**18


def sample(numel: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Values of mixed magnitudes: a heavy tail and blocks of very different scales, like real deltas."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-3, 2, (numel // BLOCK + 1,), generator=g).repeat_interleave(BLOCK)[:numel]
    return torch.randn(numel, generator=g) ** 3 * scale * 10.0 ** exponents.float()


def seal(unsealed: bytes) -> bytes:
    """A payload (without its checksum) with a valid checksum, to reach the checks behind it."""
    return unsealed + struct.pack("<I", zlib.crc32(unsealed))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("numel", [0, 1, 3, BLOCK + 1, 1000, 4096])
def test_round_trip_within_stated_bound(spec: str, seed: int, numel: int) -> None:
    codec = get_codec(spec)
    for scale in (1e-6, 1.0, 30.0):  # fp16 holds up to 65504
        x = sample(numel, seed, scale)
        decoded = codec.decode(codec.encode(x), numel)
        assert decoded.dtype == torch.float32 and decoded.shape == (numel,)
        assert bool(((decoded - x).abs() <= codec.bound(x)).all())


def test_bounds_state_the_documented_rules() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(get_codec("none").bound(x), torch.zeros(4096))
    assert torch.allclose(get_codec("fp16").bound(x), x.abs() * 2**-11 + 2**-25)
    assert torch.allclose(get_codec("bf16").bound(x), x.abs() * 2**-8, atol=1e-30)
    absmax = x.view(-1, BLOCK).abs().amax(dim=1).repeat_interleave(BLOCK)
    for spec, levels in (("int8", 127), ("int4", 7), ("int2", 1)):
        bound = get_codec(spec).bound(x)
        assert bool((bound >= absmax / (2 * levels)).all()) and bool((bound <= absmax / (2 * levels) * 1.005).all())


def test_quantizer_bounds_are_tight() -> None:
    x = sample(PART, 3)
    for spec in ("fp16", "bf16", "int8", "int4", "int2"):
        codec = get_codec(spec)
        ratio = (codec.decode(codec.encode(x), PART) - x).abs() / codec.bound(x)
        assert ratio.max() > 0.9, spec


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "int4", "int2"])
def test_decoded_values_encode_to_themselves_even_an_ulp_off(spec: str) -> None:
    """Peers that agree average to the same values (a weighted mean of equal floats is within an
    ulp of them): a quantizer must give back what they hold, or each extra round moves them."""
    codec = get_codec(spec)
    for scale in (1e-6, 1.0, 30.0):
        held = codec.decode(codec.encode(sample(4096, 5, scale)), 4096)
        for nudged in (held, held.nextafter(held * 2), held.nextafter(held * 0)):
            assert torch.equal(codec.decode(codec.encode(nudged), 4096), held), (spec, scale)


def test_topk_keeps_the_largest_exactly() -> None:
    codec = get_codec("topk:0.01")
    x = sample(PART, 4)
    decoded = codec.decode(codec.encode(x), PART)
    kept = decoded != 0
    assert int(kept.sum()) == round(0.01 * PART)
    assert torch.equal(decoded[kept], x[kept])
    assert x[kept].abs().min() >= x[~kept].abs().max()


def test_topk_indices_at_one_percent_cost_well_under_two_bytes() -> None:
    codec, x = get_codec("topk:0.01"), sample(PART, 6)  # clustered: blocks of very different scales
    k = round(0.01 * PART)
    assert len(codec.encode(x)) <= 16 + 4 * k + 1.3 * k  # header and crc, float32 values, index bytes


def test_a_sparse_mean_is_sent_as_sparse_as_one_contribution() -> None:
    topk, randomk = get_codec("topk:0.01+int8"), get_codec("randomk:0.01")
    assert topk.for_mean(4, union_fraction=0.04).name == "topk:0.01+int8"  # gTop-k: not the 4% union
    assert topk.for_mean(4, union_fraction=0.005).name == "topk:0.005+int8"  # a sparser union costs less
    shared = torch.zeros(PART)
    shared[randomk.reducer.indices(shared, seed=3)] = 1.0  # members' randomk values share their indices
    mean_codec = randomk.for_mean(4, union_fraction=(int(shared.count_nonzero()) + 1) / PART)
    assert torch.equal(mean_codec.decode(mean_codec.encode(shared), PART), shared), "a randomk mean loses nothing"


def test_topk_indices_with_wide_gaps() -> None:
    x = torch.zeros(PART)
    x[[0, 5, 70_000, PART - 1]] = torch.tensor([1.0, -2.0, 3.0, 4.0])  # gaps beyond u16 deltas
    codec = get_codec(f"topk:{4 / PART}")
    assert torch.equal(codec.decode(codec.encode(x), PART), x)


@pytest.mark.parametrize("rank", [1, 3])
def test_lowrank_is_exact_on_low_rank_input(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(256, rank, generator=g) @ torch.randn(rank, 256, generator=g)).flatten()
    codec = get_codec(f"lowrank:{rank}")
    decoded = codec.decode(codec.encode(x), x.numel())
    assert torch.allclose(decoded, x, atol=1e-4 * x.abs().max().item())


def test_lowrank_never_adds_energy() -> None:
    codec = get_codec("lowrank:4")
    for seed in range(3):
        x = sample(10_000, seed)
        assert (codec.decode(codec.encode(x), x.numel()) - x).norm() <= x.norm()


def test_chain_quantizes_the_kept_values_at_the_same_indices() -> None:
    x = sample(PART, 5)
    sparse = get_codec("topk:0.01").decode(get_codec("topk:0.01").encode(x), PART)
    chained = get_codec("topk:0.01+int8").decode(get_codec("topk:0.01+int8").encode(x), PART)
    kept = sparse != 0
    int8 = get_codec("int8")
    assert torch.equal(chained[~kept], torch.zeros(int(PART - kept.sum())))
    assert torch.equal(chained[kept], int8.decode(int8.encode(sparse[kept]), int(kept.sum())))


def test_randomk_seed_decides_the_indices() -> None:
    x = sample(PART, 6) + 1e-3  # no zeros, so the kept positions show
    codec = get_codec("randomk:0.01")
    a = codec.decode(codec.encode(x, seed=7), PART)
    assert torch.equal(a, codec.with_seed(7).decode(codec.with_seed(7).encode(x), PART))
    kept = a != 0
    assert int(kept.sum()) == round(0.01 * PART)
    assert torch.equal(a[kept], x[kept])
    b = codec.decode(codec.encode(x, seed=8), PART)
    assert (b != 0).ne(kept).any()
    assert codec.encode(x) == codec.encode(x.clone())  # the default seed comes from the data
    assert (codec.decode(codec.encode(x), PART) != 0).ne(codec.decode(codec.encode(x * 2), PART) != 0).any()


@pytest.mark.parametrize("spec", SPECS)
def test_encode_is_deterministic(spec: str) -> None:
    x = sample(5000, 7)
    assert get_codec(spec).encode(x) == get_codec(spec).encode(x.clone())


def test_error_feedback_topk_tracks_the_sum() -> None:
    codec, ef, n = get_codec("topk:0.01"), ErrorFeedback(), 4096
    g = torch.Generator().manual_seed(8)
    mean = torch.randn(n, generator=g)
    inputs = decoded = no_feedback = torch.zeros(n)
    largest = 0.0
    for _ in range(50):
        x = mean + 0.5 * torch.randn(n, generator=g)
        payload, out = ef.compress(x, codec, key="w")
        assert torch.equal(out, codec.decode(payload, n))
        inputs, decoded = inputs + x, decoded + out
        no_feedback = no_feedback + codec.decode(codec.encode(x), n)
        largest = max(largest, x.norm().item())
        assert ef.residuals["w"].norm() <= 2 / 0.01 * largest
    assert torch.allclose(decoded + ef.residuals["w"], inputs, atol=1e-3)
    assert (decoded - inputs).norm() < 0.7 * (no_feedback - inputs).norm()


def test_error_feedback_topk_catches_up_over_time() -> None:
    """A value is sent once it has added up, so the relative gap shrinks with the rounds."""
    codec, ef, n = get_codec("topk:0.01"), ErrorFeedback(), 1000
    mean = torch.randn(n, generator=torch.Generator().manual_seed(9))
    decoded = torch.zeros(n)
    for _ in range(500):
        decoded += ef.compress(mean, codec)[1]
    assert (decoded - 500 * mean).norm() < 0.15 * (500 * mean).norm()


def test_error_feedback_int4_residual_within_bound() -> None:
    codec, ef, n = get_codec("int4"), ErrorFeedback(), 4096
    g = torch.Generator().manual_seed(10)
    mean = torch.randn(n, generator=g)
    inputs = decoded = no_feedback = torch.zeros(n)
    for _ in range(50):
        x = mean + 0.1 * torch.randn(n, generator=g)
        target = x + ef.residuals.get(None, torch.zeros(n))
        out = ef.compress(x, codec)[1]
        assert bool((ef.residuals[None].abs() <= codec.bound(target)).all())
        inputs, decoded = inputs + x, decoded + out
        no_feedback = no_feedback + codec.decode(codec.encode(x), n)
    assert (decoded - inputs).norm() < 0.01 * inputs.norm()
    assert (decoded - inputs).norm() < 0.5 * (no_feedback - inputs).norm()


def test_error_feedback_keeps_shape_and_rejects_a_resized_stream() -> None:
    ef, codec = ErrorFeedback(), get_codec("int8")
    assert ef.compress(torch.ones(4, 5), codec)[1].shape == (4, 5)
    with pytest.raises(ValueError, match="reset"):
        ef.compress(torch.ones(21), codec)
    ef.reset()
    ef.compress(torch.ones(21), codec)


def test_bytes_per_value() -> None:
    x = sample(PART, 11)
    size = {
        spec: len(get_codec(spec).encode(x)) / PART
        for spec in ("fp16", "bf16", "int8", "int4", "int2", "topk:0.01+int8")
    }
    assert size["fp16"] <= 2.001 and size["bf16"] <= 2.001
    assert size["int8"] <= 1 + 2 / BLOCK + 0.001
    assert size["int4"] <= 0.5 + 2 / BLOCK + 0.001
    assert size["int2"] <= 0.25 + 2 / BLOCK + 0.001
    assert size["topk:0.01+int8"] <= 0.1


@pytest.mark.parametrize("spec", SPECS)
def test_malformed_payloads_raise_codec_error(spec: str) -> None:
    codec, x = get_codec(spec), sample(1000, 12)
    payload = codec.encode(x)
    g = torch.Generator().manual_seed(13)
    bad = [b"", b"\x00", payload[:10], payload[:-1], payload + b"\x00"]
    bad += [seal(payload[:-4] + b"\x00"), seal(payload[:-5])]
    bad += [payload[:cut] for cut in torch.randint(0, len(payload), (20,), generator=g).tolist()]
    bad += [bytes(torch.randint(0, 256, (len(payload),), generator=g, dtype=torch.uint8).tolist())]
    flipped = bytearray(payload)
    flipped[len(payload) // 2] ^= 1
    bad += [bytes(flipped), get_codec("int8" if spec != "int8" else "int4").encode(x)]
    for data in bad:
        with pytest.raises(CodecError):
            codec.decode(data, 1000)
    with pytest.raises(CodecError, match="holds 1000 values, expected 999"):
        codec.decode(payload, 999)


def test_well_sealed_but_invalid_contents_raise_codec_error() -> None:
    x = sample(1000, 14)
    topk, int8, fp16 = get_codec("topk:0.1"), get_codec("int8"), get_codec("fp16")
    wide = torch.zeros(1000)
    wide[[0, 300, 600, 900]] = 1.0  # gaps of 300: u16 deltas are shorter than bytes with escapes
    topk_u16 = get_codec("topk:0.004")
    assert topk_u16.encode(wide)[12] == 2 and topk.encode(x)[12] == 1  # the width byte
    indices = bytearray(topk_u16.encode(wide))
    indices[12 + 1 + 2 : 12 + 1 + 4] = b"\x00\x00"  # a zero delta: a repeated index
    out_of_range = bytearray(topk_u16.encode(wide))
    out_of_range[12 + 1 : 12 + 3] = b"\xff\xff"
    repeated = bytearray(topk.encode(x))
    repeated[12 + 1 + 4 + 5] = 0  # a zero delta in the byte stream
    overflowing = bytearray(topk.encode(x))
    overflowing[12 + 1 + 4 : 12 + 1 + 4 + 5] = b"\xfe" * 5  # the first indices jump past the end
    unterminated = bytearray(topk.encode(x))
    unterminated[12 + 1 + 4 + 99] = 255  # the last index byte says "more follows"
    exponent = bytearray(int8.encode(x))
    exponent[12:14] = struct.pack("<h", 999)
    infinite = bytearray(fp16.encode(x))
    infinite[12:14] = b"\x00\x7c"  # fp16 +inf
    cases = [
        (topk_u16, indices, "increasing"),
        (topk_u16, out_of_range, "out of range"),
        (topk, repeated, "increasing"),
        (topk, overflowing, "out of range"),
        (topk, unterminated, "expected 100"),
        (int8, exponent, "exponent"),
    ]
    for codec, data, message in cases + [(fp16, infinite, "non-finite")]:
        with pytest.raises(CodecError, match=message):
            codec.decode(seal(bytes(data[:-4])), 1000)


@pytest.mark.parametrize("spec", SPECS)
def test_encode_refuses_non_finite_values(spec: str) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.ones(300)
        x[17] = bad
        with pytest.raises(CodecError, match="non-finite"):
            get_codec(spec).encode(x)


def test_fp16_refuses_values_it_cannot_hold() -> None:
    with pytest.raises(CodecError, match="overflow"):
        get_codec("fp16").encode(torch.tensor([1.0, 1e6]))


def test_specs_parse_to_canonical_names() -> None:
    assert get_codec("none").name == "none" and get_codec("fp16").name == "fp16"
    assert get_codec(" TopK:0.010 + int8 ").name == "topk:0.01+int8"
    assert get_codec("topk:0.01+none").name == "topk:0.01"
    assert get_codec("lowrank:4+fp16").name == "lowrank:4+fp16"
    for spec in ("int7", "topk", "topk:0", "topk:1.5", "topk:x", "lowrank:0", "lowrank:2.5", "int8+topk:0.1",
                 "topk:0.1+randomk:0.1", "fp16+int8", "topk:0.1+int8+fp16", ""):  # fmt: skip
        with pytest.raises(ValueError, match="unknown codec"):
            get_codec(spec)
