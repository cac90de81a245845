"""The parameters of a model as one flat vector: copies, norms, digests and updates, a chunk at a time.

What ``Attachment`` does to the user's parameters, apart from when: a snapshot (``host_copy``), its norm and
a digest that finishing peers compare (``param_digest``), and the application of a round (``apply_delta``).
Passes over the parameters go a chunk of ``CHUNK_NUMEL`` values at a time, so that none takes a whole copy
of a large parameter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

# Finishing peers agree when each projection of their parameters' digests (``param_digest``) differs by
# at most this much times the parameters' norm: float32 rounding of equal means applied to each peer's own
# snapshot leaves about 1e-7 of it, a spread that matters is far larger.
AGREEMENT = 1e-6


def model_schema(params: Sequence[torch.Tensor]) -> str:
    """A short name for the shapes and dtypes of a model's parameters."""
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    numel = sum(p.numel() for p in params)
    return f"{numel}params-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): the one whose ``step`` runs the hooks."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def host_copy(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A flat float32 copy of ``params`` on the host.  From CUDA tensors the copies go into pinned
    memory without blocking, and the caller (a worker thread, not the training step) waits for them."""
    cuda = {p.device for p in params if p.device.type == "cuda"}
    out = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, pin_memory=bool(cuda))
    offset = 0
    for p in params:
        out[offset : offset + p.numel()].copy_(p.detach().reshape(-1), non_blocking=bool(cuda))
        offset += p.numel()
    for device in cuda:
        torch.cuda.current_stream(device).synchronize()
    return out


CHUNK_NUMEL = 2**20  # values per step of the chunked passes over the parameters (4 MiB of float32)


def chunks(p: torch.Tensor) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK_NUMEL, p.numel())) for a in range(0, p.numel(), CHUNK_NUMEL)]


@torch.no_grad()
def param_norm(params: Sequence[torch.Tensor]) -> float:
    """The L2 norm of all parameters, in float64, a chunk at a time: no copy of the model."""
    squares = 0.0
    for p in params:
        flat = p.detach().reshape(-1)
        for a, b in chunks(flat):
            chunk = flat[a:b].to("cpu", torch.float64)
            squares += float(torch.dot(chunk, chunk))
    return squares**0.5


DIGEST_PROJECTIONS = 4  # random directions in ``param_digest``


@torch.no_grad()
def param_digest(params: Sequence[torch.Tensor], projections: int = DIGEST_PROJECTIONS) -> list[float]:
    """The parameters' projections on ``projections`` random directions, the same on every peer (a fixed
    seed per chunk), in float64, a chunk at a time.

    Two peers whose parameters differ by ``d`` get projections that differ by about ``|d|`` each,
    independently, whatever the direction of ``d``: a difference over ten times ``AGREEMENT`` of the
    norm shows in at least one of four projections but with odds below 1e-8.  (A sum, one fixed
    direction, misses every difference that sums to zero, such as two values swapped.)  Float32
    rounding of equal means, about 1e-7 of the norm, stays within ``AGREEMENT``."""
    totals = torch.zeros(projections, dtype=torch.float64)
    generator, index = torch.Generator(), 0
    for p in params:
        flat = p.detach().reshape(-1)
        for a, b in chunks(flat):
            generator.manual_seed(index)
            directions = torch.randn(projections, b - a, generator=generator, dtype=torch.float64)
            totals += directions @ flat[a:b].to("cpu", torch.float64)
            index += 1
    return totals.tolist()


def agrees(digest: Any, ours: Sequence[float], tolerance: float) -> bool:
    """Whether a digest read from another peer's record is ours, each projection within ``tolerance``."""
    return (
        isinstance(digest, list)
        and len(digest) == len(ours)
        and all(isinstance(x, float) and abs(x - y) <= tolerance for x, y in zip(digest, ours))
    )


@torch.no_grad()
def apply_delta(params: Sequence[torch.Tensor], after: torch.Tensor, snapshot: torch.Tensor, *, becomes: bool) -> None:
    """Move ``params`` by ``after - snapshot`` (flat float32 vectors of their values).

    With ``becomes`` (no step was taken since the snapshot) the parameters become ``after``: rounded once to
    their dtype, equal values give equal parameters on every peer, in bf16 too.  Otherwise the live value plus
    the delta is formed in float32 (or the parameter's wider dtype) and rounded once.
    """
    offset = 0
    for p in params:
        n = p.numel()
        if becomes and p.dtype != torch.float64:
            p.copy_(after[offset : offset + n].view_as(p), non_blocking=True)
        elif p.is_contiguous():  # a chunk at a time: the delta never takes a whole parameter's copy
            flat = p.view(-1)
            for a, b in chunks(flat):
                delta = after[offset + a : offset + b] - snapshot[offset + a : offset + b]
                delta = delta.to(p.device, non_blocking=True)
                if p.dtype in (torch.float32, torch.float64):
                    flat[a:b].add_(delta)
                else:
                    flat[a:b].copy_(flat[a:b].float() + delta)
        else:
            delta = (after[offset : offset + n] - snapshot[offset : offset + n]).view_as(p)
            delta = delta.to(p.device, non_blocking=True)
            if p.dtype in (torch.float32, torch.float64):
                p.add_(delta)
            else:
                p.copy_(p.float() + delta)
        offset += n
