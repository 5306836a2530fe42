"""Tensor ops shared by methods, each a plain-torch reference and a Triton kernel behind one dispatcher.

    best, index = accel.kernels.best_match(a, b)                  # the backend chosen for a's device
    x, size = accel.kernels.bipartite_merge(x, size, metric, r, protected)  # ToMe's match and merge
    x, size = accel.kernels.weighted_merge(x, size, protected, unm_idx, src_idx, dst_idx)
    out = accel.kernels.biased_attention(q, k, v, bias)          # softmax(q k^T / sqrt(D) + bias[b, key]) v
    packed, index = accel.kernels.compact_tokens(x, mask, count)  # a ragged batch's active tokens
    out = accel.kernels.packed_paged_attention(q, k_cache, v_cache, tables, seq_lens, query_start)  # paged KV
    out = accel.kernels.grouped_matmul(x, w, pairs, block_experts, block, pairs_count, per_token)  # MoE experts
    y = accel.kernels.few_rows_linear(x, weight, bias)           # F.linear, faster on the CPU for few rows
    accel.kernels.best_match(a, b, backend="torch")               # or ACCEL_KERNELS=torch|triton
    accel.kernels.last_backend("best_match")                      # "torch" or "triton": what ran

One op per module (``matching``, ``merging``, ``token_merge``, ``unmerging``, ``attention``,
``compaction``, ``paged_attention``, ``grouped_matmul``), each with its reference, its kernel
(``<module>_triton``) and the public function that validates its arguments and asks
``dispatch.select`` which one runs.
``linear`` has no Triton kernel: it is the CPU's faster way to a linear layer over a few rows
(decoding), and ``F.linear`` elsewhere. Patches call these functions, never a kernel directly;
this package imports no patch, and no Triton until a kernel first runs. See docs/kernels.md for
what each kernel fuses, its exactness and its GPU figures.
"""
from __future__ import annotations

from .attention import biased_attention
from .compaction import compact_tokens, gather_tokens, scatter_tokens
from .dispatch import BACKENDS, last_backend
from .grouped_matmul import align_pairs, grouped_matmul
from .linear import few_rows_linear
from .matching import best_match, unit_rows
from .merging import amax_merge, mean_merge, mean_merge2d, weighted_merge
from .paged_attention import packed_paged_attention
from .token_merge import bipartite_merge, select_merges
from .unmerging import unmerge, unmerge2d

__all__ = ["best_match", "bipartite_merge", "select_merges", "weighted_merge", "mean_merge", "amax_merge",
           "mean_merge2d", "unmerge", "unmerge2d", "biased_attention", "gather_tokens", "scatter_tokens",
           "compact_tokens", "packed_paged_attention", "grouped_matmul", "align_pairs", "few_rows_linear", "last_backend", "unit_rows", "BACKENDS"]
