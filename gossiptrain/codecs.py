"""Codecs: how a slice of a float32 tensor becomes bytes on the wire and back.

A codec is a small pure object.  ``decode`` checks the size of what arrived and raises
``CodecError`` instead of returning a wrong tensor, so a bad payload fails the exchange loudly.
"""

from __future__ import annotations

import torch


class CodecError(ValueError):
    """The bytes cannot be decoded into a tensor of the expected size."""


class Codec:
    name: str = "abstract"

    def encode(self, tensor: torch.Tensor) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        raise NotImplementedError


class CastCodec(Codec):
    """Sends the values in a floating dtype (float32 is lossless)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.itemsize = torch.tensor([], dtype=dtype).element_size()

    def encode(self, tensor: torch.Tensor) -> bytes:
        return tensor.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().tobytes()

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        if len(data) != numel * self.itemsize:
            raise CodecError(f"{self.name}: expected {numel * self.itemsize} bytes for {numel} values, got {len(data)}")
        if numel == 0:
            return torch.empty(0)
        return torch.frombuffer(bytearray(data), dtype=self.dtype).float()


CODECS: dict[str, Codec] = {
    "none": CastCodec("none", torch.float32),
    "fp16": CastCodec("fp16", torch.float16),
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None
