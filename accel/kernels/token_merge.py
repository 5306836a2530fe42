"""ToMe's whole merge step in three launches: match, rank, merge.

    x, size = bipartite_merge(x, size, metric, r, protected)
    # x [B, N, C], size [B, N, 1] or None, metric [B, N, Cm] -> [B, N - r, C], [B, N - r, 1]

Bipartite soft matching (Bolya et al. 2023, Alg. 1) of the tokens after ``protected``: A (even
positions) to B (odd), each A token's best B token by cosine similarity of ``metric``; the ``r``
A tokens with the best scores merge into theirs, size-weighted, and the rest keep their order.
Output: the protected tokens, the kept A tokens, the B tokens.

The reference is the torch ops ToMe ran before (``best_match``, a stable argsort, slices, a
gather and a sort, then ``weighted_merge``): bit-identical to them on the CPU. On a GPU those are
about twenty launches per block, each costing more CPU time than its work at ViT sizes, so the
Triton path keeps the indices on the device in three kernels: ``best_match``; one program per
image ranking its A tokens and writing where each goes and each B token's sources; one program per
output row summing them. Up to ``MAX_FUSED_A`` A tokens (ViTs to 448 px); beyond, the reference's indices feed the
``weighted_merge`` kernel.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import torch

from .matching import best_match_reference, best_match_triton
from .merging import weighted_merge_reference, weighted_merge_triton
from .dispatch import select
from .registration import KernelOp

__all__ = ["bipartite_merge", "select_merges", "bipartite_merge_reference", "bipartite_merge_triton", "MAX_FUSED_A"]

MAX_FUSED_A = 1024  # A tokens ranked in one program (a [1024, 64] comparison tile per step)
RANK_CHUNK = 64


def select_merges(best: torch.Tensor, best_idx: torch.Tensor, r: int, *, sort_kept: bool = True
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From each A token's best score and B index (``[B, Na]``): the kept A indices
    (``unm_idx [B, Na - r]``, in order, or by decreasing score with ``sort_kept=False``), the ``r``
    best (``src_idx [B, r]``, by decreasing score, ties to the lower index) and the B index each
    merges into (``dst_idx [B, r]``)."""
    order = best.argsort(dim=-1, descending=True, stable=True)
    src_idx = order[:, :r]
    unm_idx = order[:, r:].sort(dim=-1).values if sort_kept else order[:, r:]
    return unm_idx, src_idx, best_idx.gather(1, src_idx)


def _sets(metric: torch.Tensor, protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    m = metric[:, protected:]
    return m[:, ::2], m[:, 1::2]


def bipartite_merge_reference(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                              protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, in ``x``'s dtype."""
    with torch.no_grad():
        unm_idx, src_idx, dst_idx = select_merges(*best_match_reference(*_sets(metric, protected)), r)
    return weighted_merge_reference(x, size, protected, unm_idx, src_idx, dst_idx)


def _targets_kernel() -> Any:
    from .token_merge_triton import merge_targets_kernel

    return merge_targets_kernel


def _targets_launch(best: torch.Tensor, best_idx: torch.Tensor, r: int, protected: int, num_b: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    import triton

    batch, num_a = best.shape
    target = torch.empty(batch, num_a, device=best.device, dtype=torch.int32)
    kept = torch.empty(batch, num_a - r, device=best.device, dtype=torch.int32)
    start = torch.empty(batch, num_b, device=best.device, dtype=torch.int32)
    count = torch.empty(batch, num_b, device=best.device, dtype=torch.int32)
    sources = torch.empty(batch, r, device=best.device, dtype=torch.int32)
    block = max(16, triton.next_power_of_2(num_a))
    _TARGETS.jit()[(batch,)](best, best_idx, target, kept, start, count, sources, num_a, num_b, r, protected,
                             BLOCK=block, BLOCK_B=max(16, triton.next_power_of_2(num_b)), CHUNK=RANK_CHUNK,
                             num_warps=4 if block <= 256 else 8)
    return target, kept, start, count, sources


def _targets_fake(best: torch.Tensor, best_idx: torch.Tensor, r: int, protected: int, num_b: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_a = best.shape
    new = functools.partial(best.new_empty, dtype=torch.int32)
    return new(batch, num_a), new(batch, num_a - r), new(batch, num_b), new(batch, num_b), new(batch, r)


_TARGETS = KernelOp("merge_targets", _targets_kernel, _targets_launch, _targets_fake)


def _rows_kernel() -> Any:
    from .token_merge_triton import merge_rows_kernel

    return merge_rows_kernel


def _rows_launch(x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
                 sources: torch.Tensor, protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    import triton

    batch, n, c = x.shape
    r = sources.shape[1]
    out = x.new_empty(batch, n - r, c)
    out_size = size.new_empty(batch, n - r, 1)
    _ROWS.jit()[(batch, n - r)](x, size, kept, start, count, sources, out, out_size, n, c, protected,
                                kept.shape[1] + r, start.shape[1], r, BLOCK_C=triton.next_power_of_2(c))
    return out, out_size


def _rows_fake(x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
               sources: torch.Tensor, protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, n, c = x.shape
    r = sources.shape[1]
    return x.new_empty(batch, n - r, c), size.new_empty(batch, n - r, 1)


_ROWS = KernelOp("merge_rows", _rows_kernel, _rows_launch, _rows_fake)


def bipartite_merge_triton(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                           protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernels: fp32 sums (each B token's sources in A order), outputs in the inputs' dtypes."""
    a, b = _sets(metric, protected)
    best, best_idx = best_match_triton(a, b)
    if a.shape[1] > MAX_FUSED_A:
        unm_idx, src_idx, dst_idx = select_merges(best, best_idx, r)
        return weighted_merge_triton(x, size, protected, unm_idx, src_idx, dst_idx)
    _, kept, start, count, sources = _TARGETS(best, best_idx, r, protected, b.shape[1])
    return _ROWS(x.contiguous(), size.contiguous(), kept, start, count, sources, protected)


def bipartite_merge(x: torch.Tensor, size: Optional[torch.Tensor], metric: torch.Tensor, r: int, protected: int, *,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMe's step on ``x: [B, N, C]`` (``size [B, N, 1]``, None: all 1): match the tokens after
    ``protected`` by ``metric: [B, N, Cm]`` (A = even positions, B = odd) and merge the ``r`` best A
    tokens into their B tokens, size-weighted. Returns ``x [B, N - r, C]`` and ``size``; the same
    tokens and order as ``best_match`` + ``select_merges`` + ``weighted_merge``."""
    if x.ndim != 3 or metric.ndim != 3 or metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"bipartite_merge: expected x [B, N, C] and metric [B, N, Cm]; got {tuple(x.shape)} and "
                         f"{tuple(metric.shape)}")
    num_a = (x.shape[1] - protected + 1) // 2
    if not 0 < r <= num_a or x.shape[1] - protected < 2:
        raise ValueError(f"bipartite_merge: r must be 1..{num_a} (the A tokens after {protected} protected); got {r}")
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    if select("bipartite_merge", x, backend) == "triton":
        return bipartite_merge_triton(x, size, metric, r, protected)
    return bipartite_merge_reference(x, size, metric, r, protected)
