"""Bipartite matching scores: each row of ``a`` finds its most similar row of ``b`` (cosine similarity).

    best, index = best_match(a, b)      # a: [B, Na, C], b: [B, Nb, C] -> [B, Na] float32, [B, Na] int64

ToMe's Alg. 1 step (Bolya et al. 2023): normalise the rows, take every a-b dot product, keep each
a-row's maximum and its argmax (ties to the lower b-index). The reference does it as three torch
ops and writes the ``Na x Nb`` score matrix to memory; the Triton kernel fuses them: b is streamed
through a tile of a-rows, each tile's dot products reduced to a running maximum, so the score
matrix never exists (memory O(Na + Nb), one launch). Narrow metrics (ViT keys, 64 channels) take
a product-sum of normalised rows; wide ones (SD features) ``tl.dot`` on the tensor cores.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .dispatch import interpreting, select
from .registration import KernelOp

__all__ = ["best_match", "unit_rows", "best_match_reference", "best_match_triton"]

BLOCK_A, BLOCK_B = 16, 16  # rows of a and of b per tile of the product-sum (a [16, 16, C] product)
DOT_ABOVE = 64  # wider metrics (SD features, 320+ channels) take tensor-core tiles, 64 x 64 x 64
DOT_BLOCK = 64
# On that path scores closer than this count as tied (to the lower index): the same dot product
# may round differently at another position of a tensor-core tile; cosine similarities are within
# [-1, 1] and fp32 rounding of a few hundred products stays far below it.
DOT_TIE = 2e-6


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, so dot products are cosine similarities."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def best_match_reference(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: ``[B, Na]`` best cosine similarity (in ``a``'s dtype) and its b-index."""
    return (unit_rows(a) @ unit_rows(b).transpose(-1, -2)).max(dim=-1)


def _kernel() -> Any:
    from .matching_triton import best_match_kernel

    return best_match_kernel


def _launch(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    import triton

    batch, num_a, channels = a.shape
    best = torch.empty(batch, num_a, device=a.device, dtype=torch.float32)
    index = torch.empty(batch, num_a, device=a.device, dtype=torch.int64)
    dot = channels > DOT_ABOVE
    block_a, block_b = (DOT_BLOCK, DOT_BLOCK) if dot else (BLOCK_A, BLOCK_B)
    block_c = DOT_BLOCK if dot else max(16, triton.next_power_of_2(channels))
    grid = (batch, triton.cdiv(num_a, block_a))
    _OP.jit()[grid](a, b, best, index, num_a, b.shape[1], channels, *a.stride(), *b.stride(),
                    BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c, USE_DOT=dot,
                    PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                    WIDEN=interpreting() and a.dtype == torch.bfloat16, TIE=DOT_TIE if dot else 0.0)
    return best, index


def _fake(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return a.new_empty(a.shape[:2], dtype=torch.float32), a.new_empty(a.shape[:2], dtype=torch.int64)


_OP = KernelOp("best_match", _kernel, _launch, _fake)


def best_match_triton(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel: ``[B, Na]`` best cosine similarity (float32, accumulated in fp32 whatever the
    input dtype) and its b-index."""
    return _OP(a, b)


def best_match(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a: [B, Na, C]``, the most similar row of ``b: [B, Nb, C]`` (cosine
    similarity; ties to the lower index): ``best [B, Na]`` and ``index [B, Na]`` (int64). The
    Triton kernel returns ``best`` in float32, the reference in ``a``'s dtype."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"best_match: expected a [B, Na, C] and b [B, Nb, C]; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if b.shape[1] == 0:
        raise ValueError("best_match: b has no rows to match to")
    chosen = select("best_match", a, backend)
    if chosen == "triton":
        return best_match_triton(a, b)
    return best_match_reference(a, b)
