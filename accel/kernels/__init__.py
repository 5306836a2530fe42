"""Tensor ops shared by methods, each a plain-torch reference and a Triton kernel behind one dispatcher.

    best, index = accel.kernels.best_match(a, b)                  # the backend chosen for a's device
    x, size = accel.kernels.weighted_merge(x, size, protected, unm_idx, src_idx, dst_idx)
    x, size = accel.kernels.bipartite_merge(x, size, metric, r, protected)  # match and merge, indices on the device
    accel.kernels.best_match(a, b, backend="torch")               # or ACCEL_KERNELS=torch|triton
    out = accel.kernels.biased_attention(q, k, v, bias)          # softmax(q k^T / sqrt(D) + bias[b, key]) v
    accel.kernels.last_backend("best_match")                      # "torch" or "triton": what ran

Patches call these functions, never a kernel directly; this package imports no patch, and no
Triton until a kernel first runs. See ``dispatch`` for how the backend is chosen.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .attention import biased_attention_reference, biased_attention_triton
from .dispatch import BACKENDS, last_backend, select
from .matching import best_match_reference, best_match_triton, unit_rows
from .merging import weighted_merge_reference, weighted_merge_triton
from .token_merge import bipartite_merge_reference, bipartite_merge_triton, select_merges

__all__ = ["best_match", "weighted_merge", "bipartite_merge", "select_merges", "biased_attention", "last_backend", "unit_rows", "BACKENDS"]


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


def weighted_merge(x: torch.Tensor, size: Optional[torch.Tensor], protected: int, unm_idx: torch.Tensor,
                   src_idx: torch.Tensor, dst_idx: torch.Tensor, *, backend: Optional[str] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x: [B, N, C]`` by a bipartite matching (``unm_idx [B, Na - r]``, ``src_idx``/``dst_idx
    [B, r]``, after ``protected`` tokens), each token weighted by ``size [B, N, 1]`` (None: all 1):
    ``x [B, N - r, C]`` and the summed ``size [B, N - r, 1]``. The reference computes in ``x``'s
    dtype; the Triton kernel accumulates in fp32 (equal in fp32, within bf16/fp16 rounding else)."""
    if x.ndim != 3 or src_idx.shape != dst_idx.shape or src_idx.shape[0] != x.shape[0]:
        raise ValueError(f"weighted_merge: expected x [B, N, C] and src_idx, dst_idx [B, r]; got {tuple(x.shape)}, "
                         f"{tuple(src_idx.shape)}, {tuple(dst_idx.shape)}")
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    chosen = select("weighted_merge", x, backend)
    if chosen == "triton":
        return weighted_merge_triton(x, size, protected, unm_idx, src_idx, dst_idx)
    return weighted_merge_reference(x, size, protected, unm_idx, src_idx, dst_idx)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *,
                     dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + bias[b, key]) v`` for ``q: [B, H, Nq, D]``, ``k, v: [B, H, Nk, D]``
    and a per-key ``bias: [B, Nk]`` (proportional attention's log size; -inf masks a key). The
    reference is SDPA with the bias as a float mask in q's dtype; attention dropout
    (``dropout_p > 0``) always takes it."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"biased_attention: expected q [B, H, Nq, D] and k, v [B, H, Nk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if bias.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"biased_attention: bias must be [B, Nk] = {(k.shape[0], k.shape[2])}; got {tuple(bias.shape)}")
    chosen = select("biased_attention", q, "torch" if dropout_p else backend)
    if chosen == "triton":
        return biased_attention_triton(q, k, v, bias)
    return biased_attention_reference(q, k, v, bias, dropout_p)


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
