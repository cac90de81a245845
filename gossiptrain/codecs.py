"""Codecs: how a slice of a float32 tensor becomes bytes on the wire and back.

A codec is a small, immutable, pure object chosen by a spec string (see ``get_codec``)::

    none | fp16 | bf16 | int8 | int4 | int2           dense: every value, cast or quantized
    topk:<fraction> | randomk:<fraction> | lowrank:<rank>   reducers: fewer numbers than values
    <reducer>+<dense>   e.g. topk:0.01+int8           the reducer's numbers sent by the dense codec

``encode(x)`` and ``decode(payload, numel)`` depend only on their inputs (and the seed, see below),
so one codec serves every part of every stream; what a lossy codec drops is carried over by
``ErrorFeedback``.  ``bound(x)`` states each codec's error: ``|decode(encode(x)) - x| <= bound(x)``
elementwise, which the tests check.

Payload (little-endian)::

    b"gtc1" | spec id: u32 (crc32 of the canonical spec) | numel: u32 | reducer part | dense part | crc32: u32

    reducer part   dense: nothing
                   topk: width: u8 (1, 2 or 4) | the k index deltas (first delta = first index):
                         as u16 or i32, or for width 1 as bytes: length: u32 | each delta d as
                         d // 255 bytes of 255 then one byte d % 255 (the smallest width is used)
                   randomk: seed: u64 (the indices are drawn from it, not sent)
                   lowrank: nothing (the dense part holds P then Q, row-major)
    dense part     none/fp16/bf16: the values in that dtype
                   int8/int4/int2: exponent: i16 | one fp16 scale per block of 128 values | int8
                   values, or int4 values two per byte (low nibble first, stored as q + 8), or int2
                   (ternary: -1, 0, 1) values four per byte (lowest bits first, stored as q + 2)

Every size follows from the spec and ``numel``, so ``decode`` checks all of them and the checksum,
and raises ``CodecError`` with what was wrong instead of returning a wrong tensor.  It also refuses
non-finite results; ``encode`` refuses non-finite input, so NaN/Inf are never sent.

Seeds: ``randomk`` draws its indices and ``lowrank`` its starting matrix from a seed, taken from
``encode(x, seed=...)``, else from ``codec.with_seed(seed)``, else derived from the data (a crc32 of
the values, so that it changes from round to round).  randomk's seed travels in the payload, so a
receiver needs no agreement; peers that want the same random indices (to sum sparse values) pass the
same seed.  lowrank sends both factors, so its seed only makes ``encode`` deterministic.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Hashable
from dataclasses import dataclass, replace

import torch

BLOCK = 128
_MAGIC = b"gtc1"
_HEADER = struct.Struct("<4sII")
_CRC = struct.Struct("<I")


class CodecError(ValueError):
    """The bytes cannot be decoded into a tensor of the expected size, or a tensor cannot be encoded."""


class NonFiniteValues(CodecError):
    """A well-formed payload decodes to NaN or Inf."""


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: amin/amax propagate NaN, and one pass of them is ~10x faster than
    ``isfinite(x).all()``, which the exchange would otherwise spend much of a round's CPU on."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, not copied: callers join them into a payload at once (the one copy)."""
    return memoryview(tensor.contiguous().view(torch.uint8).numpy())


class _Reader:
    """Takes typed sections from a payload body, failing with a clear message when it runs short."""

    def __init__(self, data: memoryview, codec: str):
        self.data, self.pos, self.codec = data, 0, codec

    def _advance(self, size: int) -> int:
        start, self.pos = self.pos, self.pos + size
        if self.pos > len(self.data):
            raise CodecError(f"{self.codec}: payload body too short: needs {self.pos} bytes, has {len(self.data)}")
        return start

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        start = self._advance(count * dtype.itemsize)
        chunk = bytearray(self.data[start : self.pos])  # a copy: aligned, writable, not aliasing the caller's bytes
        return torch.frombuffer(chunk, dtype=dtype) if count else torch.empty(0, dtype=dtype)

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack_from(self.data, self._advance(fmt.size))

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise CodecError(f"{self.codec}: {len(self.data) - self.pos} unexpected bytes after the payload body")


# ---- dense stages: every given value, cast or quantized -------------------------------------------


@dataclass(frozen=True)
class _Cast:
    """Values in a floating dtype; round to nearest, so the error is ``rel * |x| + tiny``."""

    name: str
    dtype: torch.dtype
    rel: float  # unit roundoff: 2**-(significand bits)
    tiny: float  # half the spacing of the dtype's subnormals

    def pack(self, x: torch.Tensor) -> memoryview:
        y = x.to(self.dtype)
        if y.dtype != x.dtype and not _all_finite(y):  # a narrower float may overflow
            raise CodecError(f"{self.name}: values up to {x.abs().max().item():.3g} overflow {self.dtype}")
        return _raw(y)

    def unpack(self, reader: _Reader, count: int) -> torch.Tensor:
        return reader.take(count, self.dtype).float()

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * self.rel + self.tiny


_EXPONENT = struct.Struct("<h")


@dataclass(frozen=True)
class _Blockwise:
    """Symmetric absmax quantization in blocks of ``BLOCK`` values to ``-levels..levels``.

    Block scales are fp16, relative to a per-payload power of two so that small deltas do not fall
    into fp16's subnormals, and rounded to nearest, or up where the block's largest value would
    clip by more than half a level.  Rounding to nearest makes decoded values a fixed point: they
    encode to the same bytes again, so peers that agree and average once more stay in agreement
    (always rounding up would grow a scale by an fp16 step whenever the mean of equal values came
    out one float32 ulp above them).  Error per value, in a block of absmax ``a`` in a payload of
    largest absmax ``A``: ``a / (2 * levels) * (1 + 2**-8) + A / levels * 2**-23``.
    """

    name: str
    levels: int
    bits: int

    def pack(self, x: torch.Tensor) -> bytes:
        n = x.numel()
        blocks = torch.nn.functional.pad(x, (0, -n % BLOCK)).view(-1, BLOCK)
        wanted = blocks.abs().amax(dim=1) / self.levels
        exponent = math.frexp(wanted.max().item())[1] if n else 0
        relative = (wanted.double() * 2.0**-exponent).float()  # in [0, 1)
        stored = relative.half()
        clips = stored.float() * (self.levels + 0.5) < relative * self.levels
        stored = (stored.view(torch.int16) + clips).view(torch.float16)  # one fp16 step up
        scale = self._scales(stored, exponent)
        q = torch.round(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        q = q.clamp_(-self.levels, self.levels).to(torch.int8).flatten()[:n]
        if self.bits < 8:
            per_byte = 8 // self.bits
            u = torch.nn.functional.pad(q + 2 ** (self.bits - 1), (0, -n % per_byte)).to(torch.uint8)
            u = u.view(-1, per_byte) << torch.arange(0, 8, self.bits, dtype=torch.uint8)
            q = u.sum(dim=1, dtype=torch.uint8)  # the fields do not overlap: the sum is their bitwise or
        return _EXPONENT.pack(exponent) + _raw(stored) + _raw(q)

    def unpack(self, reader: _Reader, count: int) -> torch.Tensor:
        (exponent,) = reader.unpack(_EXPONENT)
        if not -160 <= exponent <= 130:
            raise CodecError(f"{self.name}: scale exponent {exponent} is outside float32's range")
        scale = self._scales(reader.take(-(-count // BLOCK), torch.float16), exponent)
        if self.bits == 8:
            q = reader.take(count, torch.int8)
        else:
            per_byte = 8 // self.bits
            packed = reader.take(-(-count // per_byte), torch.uint8)
            fields = packed[:, None] >> torch.arange(0, 8, self.bits, dtype=torch.uint8)
            q = (fields & (2**self.bits - 1)).flatten()[:count].to(torch.int8) - 2 ** (self.bits - 1)
        blocks = torch.nn.functional.pad(q, (0, -count % BLOCK)).view(-1, BLOCK).float() * scale[:, None]
        return blocks.flatten()[:count]

    @staticmethod
    def _scales(stored: torch.Tensor, exponent: int) -> torch.Tensor:
        return (stored.double() * 2.0**exponent).float()

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        absmax = torch.nn.functional.pad(x.abs(), (0, -n % BLOCK)).view(-1, BLOCK).amax(dim=1)
        top = absmax.max().item() if n else 0.0
        per_block = absmax / (2 * self.levels) * (1 + 2**-8) + top / self.levels * 2**-23
        return per_block.repeat_interleave(BLOCK)[:n]


_Dense = _Cast | _Blockwise

_DENSE: dict[str, _Dense] = {
    "none": _Cast("none", torch.float32, 0.0, 0.0),
    "fp16": _Cast("fp16", torch.float16, 2**-11, 2**-25),
    "bf16": _Cast("bf16", torch.bfloat16, 2**-8, 2**-134),
    "int8": _Blockwise("int8", 127, 8),
    "int4": _Blockwise("int4", 7, 4),
    "int2": _Blockwise("int2", 1, 2),  # ternary, as SparseLoCo's 2-bit pseudo-gradients (with error feedback)
}


# ---- reducers: fewer numbers than values, handed to the dense stage -------------------------------


@dataclass(frozen=True)
class _Identity:
    """No reduction: the dense stage gets every value."""

    name = ""
    seeded = False

    def count(self, numel: int) -> int:
        return numel

    def reduce(self, x: torch.Tensor, seed: int) -> tuple[bytes, torch.Tensor]:
        return b"", x

    def read_side(self, reader: _Reader, numel: int) -> None:
        return None

    def expand(self, side: None, values: torch.Tensor, numel: int) -> torch.Tensor:
        return values

    def bound(self, x: torch.Tensor, seed: int, dense: _Dense) -> torch.Tensor:
        return dense.bound(x)


_SEED = struct.Struct("<Q")
_WIDTH = struct.Struct("<B")
_LENGTH = struct.Struct("<I")


def _byte_deltas(deltas: torch.Tensor) -> torch.Tensor:
    """Index deltas as bytes: ``d`` becomes ``d // 255`` bytes of 255, then ``d % 255``; the
    cumulative sum of the bytes, read at the bytes that are not 255, gives the indices back."""
    escapes = deltas // 255
    out = torch.full((int((escapes + 1).sum()),), 255, dtype=torch.uint8)
    out[torch.cumsum(escapes + 1, 0) - 1] = (deltas % 255).to(torch.uint8)
    return out


@dataclass(frozen=True)
class _Sparse:
    """k of the values, at their indices: the k largest in magnitude (topk) or random ones (randomk).

    randomk draws one index uniformly from each of k strata of n // k or n // k + 1 values: every value
    has about the same chance, no two indices collide, and it costs O(k).  Kept values go through the
    dense stage; the error of a dropped value is the value itself, and topk drops none larger than the
    k-th largest magnitude.
    """

    kind: str  # "topk" | "randomk"
    fraction: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.fraction!r}"

    @property
    def seeded(self) -> bool:
        return self.kind == "randomk"

    def count(self, numel: int) -> int:
        return min(numel, max(1, round(self.fraction * numel))) if numel else 0

    def indices(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self._random(x.numel(), seed) if self.kind == "randomk" else self._top(x)

    def _top(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(x.abs(), self.count(x.numel()), sorted=False).indices.sort().values

    def _random(self, numel: int, seed: int) -> torch.Tensor:
        k = self.count(numel)
        starts = torch.arange(k + 1, dtype=torch.int64) * numel // max(k, 1)
        draws = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return starts[:-1] + (draws * (starts[1:] - starts[:-1])).long()

    def reduce(self, x: torch.Tensor, seed: int) -> tuple[bytes, torch.Tensor]:
        idx = self.indices(x, seed)
        if self.kind == "randomk":
            return _SEED.pack(seed), x[idx]
        deltas = torch.diff(idx, prepend=idx.new_zeros(1))
        escapes = int((deltas // 255).sum()) if idx.numel() else 0
        if _LENGTH.size + idx.numel() + escapes < 2 * idx.numel():  # ~1.1 bytes per index at 1% density
            return _WIDTH.pack(1) + _LENGTH.pack(idx.numel() + escapes) + _raw(_byte_deltas(deltas)), x[idx]
        width = 4 if idx.numel() and int(deltas.max()) >= 2**16 else 2
        return _WIDTH.pack(width) + _raw(deltas.to(torch.int32 if width == 4 else torch.uint16)), x[idx]

    def read_side(self, reader: _Reader, numel: int) -> torch.Tensor:
        if self.kind == "randomk":
            return self._random(numel, reader.unpack(_SEED)[0])
        (width,) = reader.unpack(_WIDTH)
        if width not in (1, 2, 4):
            raise CodecError(f"{self.name}: index width {width} is not 1, 2 or 4 bytes")
        k = self.count(numel)
        if width == 1:
            idx = self._read_byte_deltas(reader, k, numel)
        else:
            idx = reader.take(k, torch.uint16 if width == 2 else torch.int32).long().cumsum(0)
        if idx.numel() and (int(idx[0]) < 0 or (idx.numel() > 1 and int(torch.diff(idx).min()) < 1)):
            raise CodecError(f"{self.name}: indices are not strictly increasing")
        if idx.numel() and int(idx[-1]) >= numel:
            raise CodecError(f"{self.name}: index {int(idx[-1])} is out of range for {numel} values")
        return idx

    def _read_byte_deltas(self, reader: _Reader, k: int, numel: int) -> torch.Tensor:
        (length,) = reader.unpack(_LENGTH)
        if not k <= length <= k + numel // 255 + 1:
            raise CodecError(f"{self.name}: {length} index bytes cannot hold {k} indices below {numel}")
        stream = reader.take(length, torch.uint8).long()
        ends = stream != 255
        if int(ends.sum()) != k or (length and not bool(ends[-1])):
            raise CodecError(f"{self.name}: the index bytes hold {int(ends.sum())} indices, expected {k}")
        return stream.cumsum(0)[ends]

    def expand(self, idx: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
        out = torch.zeros(numel)
        out[idx] = values
        return out

    def bound(self, x: torch.Tensor, seed: int, dense: _Dense) -> torch.Tensor:
        idx = self.indices(x, seed)
        out = x.abs()
        out[idx] = dense.bound(x[idx])
        return out


@dataclass(frozen=True)
class _LowRank:
    """PowerSGD's compressor (Vogels et al., NeurIPS 2019) without its state.

    The values, zero-padded, form a ``rows x cols`` matrix M with cols = ceil(sqrt(n)).  One power
    iteration from a seeded random Q gives an orthonormal P (rows x r) and Q = M^T P (cols x r); the
    receiver gets P Q^T, the projection of M's columns onto span(P).  So each value's error is at most
    the norm of its column of M, plus what the dense stage does to P and Q.
    """

    rank: int
    seeded = True

    @property
    def name(self) -> str:
        return f"lowrank:{self.rank}"

    def shape(self, numel: int) -> tuple[int, int, int]:
        cols = math.isqrt(numel - 1) + 1 if numel else 1
        rows = -(-numel // cols)
        return rows, cols, min(self.rank, rows, cols)

    def count(self, numel: int) -> int:
        rows, cols, r = self.shape(numel)
        return (rows + cols) * r

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols, _ = self.shape(x.numel())
        return torch.nn.functional.pad(x, (0, rows * cols - x.numel())).view(rows, cols)

    def factors(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._matrix(x)
        _, cols, r = self.shape(x.numel())
        start = torch.randn(cols, r, generator=torch.Generator().manual_seed(seed))
        p = torch.linalg.qr(m @ start).Q
        return p, m.T @ p

    def reduce(self, x: torch.Tensor, seed: int) -> tuple[bytes, torch.Tensor]:
        p, q = self.factors(x, seed)
        return b"", torch.cat([p.flatten(), q.flatten()])

    def read_side(self, reader: _Reader, numel: int) -> None:
        return None

    def expand(self, side: None, values: torch.Tensor, numel: int) -> torch.Tensor:
        rows, cols, r = self.shape(numel)
        p, q = values[: rows * r].view(rows, r), values[rows * r :].view(cols, r)
        return (p @ q.T).flatten()[:numel]

    def bound(self, x: torch.Tensor, seed: int, dense: _Dense) -> torch.Tensor:
        p, q = self.factors(x, seed)
        errors = dense.bound(torch.cat([p.flatten(), q.flatten()]))
        bp, bq = errors[: p.numel()].view_as(p), errors[p.numel() :].view_as(q)
        projection = self._matrix(x).norm(dim=0).expand(p.shape[0], -1)
        total = projection + p.abs() @ bq.T + bp @ (q.abs() + bq).T
        return (total * (1 + 2**-12)).flatten()[: x.numel()]


_Reducer = _Identity | _Sparse | _LowRank


# ---- the codec -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """A reducer followed by a dense stage, framed with a header and a checksum (module docstring).

    Made by ``get_codec``.

    Args:
        name: the canonical spec, e.g. ``"topk:0.01+int8"``; its crc32 identifies the codec on the wire.
        seed: default seed of ``encode``/``bound``; ``None`` derives it from the data.
    """

    name: str
    dense: _Dense
    reducer: _Reducer = _Identity()
    seed: int | None = None

    def with_seed(self, seed: int | None) -> Codec:
        """The same codec with a fixed seed, e.g. one derived from (round, part) that all peers share."""
        return replace(self, seed=seed)

    @property
    def spec_id(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def is_dense(self) -> bool:
        """True if every value is sent (cast or quantized); False for topk/randomk/lowrank chains."""
        return isinstance(self.reducer, _Identity)

    @property
    def lossless(self) -> bool:
        """True for ``none``: what is decoded is exactly what was encoded (no error feedback needed)."""
        return self.is_dense and self.dense.name == "none"

    @property
    def dense_stage(self) -> Codec:
        """The chain's dense stage alone (``int8`` for ``topk:0.01+int8``): every value, quantized."""
        return Codec(self.dense.name, self.dense)

    def for_mean(self, contributions: int, union_fraction: float) -> Codec:
        """The codec for a mean of ``contributions`` payloads of this codec.

        A mean of sparse vectors has up to ``contributions`` times as many non-zeros (``union_fraction``
        of the values at most, per part): it is sent as topk of this codec's fraction, the global
        top-k of gTop-k SGD (Shi et al., ICDCS 2019), so that the reply is no denser than one
        contribution.  Members treat what it drops as not exchanged (``gossiptrain.wire``).  A mean
        of randomk vectors with shared indices keeps them all.  A mean of rank-r matrices has rank up
        to ``contributions * r`` and is sent at that rank.  Dense codecs are unchanged.
        """
        if isinstance(self.reducer, _Sparse):
            reducer = _Sparse("topk", min(1.0, union_fraction, self.reducer.fraction))
        elif isinstance(self.reducer, _LowRank):
            reducer = _LowRank(self.reducer.rank * contributions)
        else:
            return self
        name = reducer.name if self.dense.name == "none" else f"{reducer.name}+{self.dense.name}"
        return Codec(name, self.dense, reducer)

    def accepts_mean_codec(self, other: Codec) -> bool:
        """Whether ``other`` is a codec that ``for_mean`` of this codec can produce (checked on receipt)."""
        if other.dense != self.dense:
            return False
        if isinstance(self.reducer, _Sparse):
            return isinstance(other.reducer, _Sparse) and other.reducer.kind == "topk"
        return type(other.reducer) is type(self.reducer)

    def encode(self, tensor: torch.Tensor, seed: int | None = None) -> bytes:
        """Bytes for ``tensor``'s values (flattened); raises ``CodecError`` on NaN/Inf."""
        x = _values(tensor, self.name)
        side, numbers = self.reducer.reduce(x, self._seed(x, seed))
        head, body = _HEADER.pack(_MAGIC, self.spec_id, x.numel()) + side, self.dense.pack(numbers)
        return b"".join([head, body, _CRC.pack(zlib.crc32(body, zlib.crc32(head)))])

    def decode(self, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
        """A float32 tensor of exactly ``numel`` values, or ``CodecError`` saying what is wrong with ``data``."""
        view = memoryview(data).cast("B")
        if len(view) < _HEADER.size + _CRC.size:
            raise CodecError(f"{self.name}: payload of {len(view)} bytes is shorter than its header and checksum")
        magic, spec_id, sent_numel = _HEADER.unpack_from(view)
        if magic != _MAGIC:
            raise CodecError(f"{self.name}: not a codec payload (starts with {bytes(magic)!r}, not {_MAGIC!r})")
        if zlib.crc32(view[: -_CRC.size]) != _CRC.unpack_from(view, len(view) - _CRC.size)[0]:
            raise CodecError(f"{self.name}: checksum mismatch in a payload of {len(view)} bytes: corrupted or cut")
        if spec_id != self.spec_id:
            raise CodecError(f"payload is from another codec than {self.name!r}: do all peers use the same codec?")
        if sent_numel != numel:
            raise CodecError(f"{self.name}: payload holds {sent_numel} values, expected {numel}")
        reader = _Reader(view[_HEADER.size : -_CRC.size], self.name)
        side = self.reducer.read_side(reader, numel)
        numbers = self.dense.unpack(reader, self.reducer.count(numel))
        reader.finish()
        out = self.reducer.expand(side, numbers, numel)
        if not _all_finite(out):
            raise NonFiniteValues(f"{self.name}: payload decodes to non-finite values")
        return out

    def bound(self, tensor: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Per-value bound on ``|decode(encode(tensor, seed)) - tensor|`` (flattened), for tests and tuning."""
        x = _values(tensor, self.name)
        return self.reducer.bound(x, self._seed(x, seed), self.dense)

    def _seed(self, x: torch.Tensor, seed: int | None) -> int:
        if not self.reducer.seeded:
            return 0
        chosen = self.seed if seed is None else seed
        return zlib.crc32(x.numpy()) if chosen is None else chosen % 2**64


def _values(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    x = tensor.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    if x.numel() >= 2**32:
        raise CodecError(f"{codec}: {x.numel()} values is too many for one payload; send parts below 2**32")
    if not _all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise CodecError(f"{codec}: refusing to encode {bad} non-finite (NaN/Inf) values of {x.numel()}")
    return x


class ErrorFeedback:
    """Error feedback: what a lossy codec drops from a stream is sent in later rounds, not lost.

    Each stream (a key: a tensor, a shard) keeps a residual ``e``.  ``compress(x)`` sends ``C(x + e)``
    and keeps ``e = x + e - C(x + e)``, so after T rounds the sum of what was decoded is the sum of the
    inputs minus the last residual.  Without it topk would never send the small coordinates and a
    quantizer's rounding bias would add up; with it they arrive once they have added up, and the
    residual stays bounded (elementwise by ``codec.bound`` for quantizers; in norm by ``2 / f`` times
    the largest input for topk:f; Stich et al., NeurIPS 2018; Karimireddy et al., ICML 2019).
    Compress quantities that add up over rounds (parameter deltas, pseudo-gradients), not raw weights.
    The residual assumes the payload arrives: what an undelivered payload carried is lost.
    """

    def __init__(self) -> None:
        self.residuals: dict[Hashable, torch.Tensor] = {}

    def compress(
        self, x: torch.Tensor, codec: Codec, key: Hashable = None, seed: int | None = None
    ) -> tuple[bytes, torch.Tensor]:
        """The payload for ``x`` plus the stream's residual, and what receivers will decode (shaped like ``x``)."""
        values = x.detach().reshape(-1).to("cpu", torch.float32)
        residual = self.residuals.get(key)
        if residual is not None and residual.numel() != values.numel():
            raise ValueError(
                f"stream {key!r} changed from {residual.numel()} to {values.numel()} values; reset it first"
            )
        target = values if residual is None else values + residual
        payload = codec.encode(target, seed=seed)
        decoded = codec.decode(payload, target.numel())
        self.residuals[key] = target - decoded
        return payload, decoded.view(x.shape)

    def reset(self, key: Hashable = None) -> None:
        """Forget the residual of ``key`` (e.g. after loading another peer's state)."""
        self.residuals.pop(key, None)


def get_codec(spec: str) -> Codec:
    """The codec for ``spec``: a dense codec, a reducer, or ``<reducer>+<dense>`` (module docstring)."""
    stages = [stage.strip() for stage in spec.strip().lower().split("+")]
    if ":" in stages[-1]:
        stages.append("none")
    try:
        reducer = _parse_reducer(stages[0]) if len(stages) == 2 else _Identity()
        dense = _DENSE[stages[-1]] if len(stages) <= 2 else None
    except (ValueError, KeyError):
        dense = None
    if dense is None:
        raise ValueError(
            f"unknown codec {spec!r}: use one of {', '.join(_DENSE)}, topk:<fraction>, randomk:<fraction>, "
            "lowrank:<rank>, or a reducer and a dense codec joined by '+', e.g. topk:0.01+int8"
        )
    if not reducer.name:
        return Codec(dense.name, dense)
    return Codec(reducer.name if dense.name == "none" else f"{reducer.name}+{dense.name}", dense, reducer)


def _parse_reducer(stage: str) -> _Reducer:
    kind, _, arg = stage.partition(":")
    if kind in ("topk", "randomk") and 0 < (fraction := float(arg)) <= 1:
        return _Sparse(kind, fraction)
    if kind == "lowrank" and (rank := int(arg)) >= 1:
        return _LowRank(rank)
    raise ValueError(stage)
