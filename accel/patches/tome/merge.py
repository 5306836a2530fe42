"""Bipartite soft matching and merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Tensors in, tensors out: no framework here. Shapes: ``x: [B, N, C]``, ``size: [B, N, 1]``.

The first ``protected`` tokens (CLS, distillation, registers) never take part in matching and
stay first, in order. The remaining tokens are split alternately into sets A (even positions)
and B (odd positions); each A token picks its most similar B token (cosine similarity of the
metric); the ``r`` A tokens with the most similar partners are merged into them (Sec. 3 of the
paper). Output order: protected tokens, unmerged A tokens in their original order, B tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ...kernels import amax_merge, best_match, mean_merge, select_merges, unit_rows, unmerge, weighted_merge
from ...kernels.merging import merge_reference

__all__ = ["BipartiteMatch", "unit_rows", "match_sets", "bipartite_soft_matching", "merge_weighted", "merge_source",
           "initial_source"]


@dataclass
class BipartiteMatch:
    """A matching between set A and set B of one batch of token sequences.

    unm_idx: [B, Na - r] A-indices kept; src_idx: [B, r] A-indices merged away;
    dst_idx: [B, r] the B-index each of those merges into.
    """

    protected: int
    num_tokens: int
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]; merged tokens are reduced with ``mode`` (sum, mean, amax)."""
        args = (self.protected, self.unm_idx, self.src_idx, self.dst_idx)
        if mode == "mean":
            return mean_merge(x, *args)
        if mode == "amax":
            return amax_merge(x, *args)
        return merge_reference(x, *args, mode=mode)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: every token merged away takes its destination's value."""
        return unmerge(x, self.protected, self.unm_idx, self.src_idx, self.dst_idx)


def match_sets(a: torch.Tensor, b: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of the rows of ``a: [B, Na, C]`` to ``b: [B, Nb, C]`` (Alg. 1).

    Each a-token's edge goes to its most similar b-token (cosine similarity, ``accel.kernels.best_match``);
    the ``r`` strongest edges are kept (ties to the lower index). Returns ``unm_idx [B, Na - r]`` (by
    decreasing similarity), ``src_idx [B, r]`` and ``dst_idx [B, r]`` (the b-index each of those merges into).
    """
    return select_merges(*best_match(a, b), r, sort_kept=False)


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> BipartiteMatch:
    """Match ``r`` tokens of ``metric: [B, N, C]`` for merging (the paper's Alg. 1).

    ``r`` is capped at the size of set A; ties between equal scores go to the lower index.
    """
    batch, n, _ = metric.shape
    num_a = (n - protected + 1) // 2
    r = max(0, min(r, num_a)) if n - protected > 1 else 0  # a single token has no B token to merge into
    if r == 0:  # nothing to merge (one token, or r=0): no scores to compute
        unm_idx = torch.arange(num_a, device=metric.device).expand(batch, -1)
        return BipartiteMatch(protected, n, unm_idx, unm_idx[:, :0], unm_idx[:, :0])
    with torch.no_grad():
        m = metric[:, protected:]  # best_match normalises the rows
        unm_idx, src_idx, dst_idx = select_merges(*best_match(m[:, ::2], m[:, 1::2]), r)  # kept tokens in order
    return BipartiteMatch(protected, n, unm_idx, src_idx, dst_idx)


def merge_weighted(
    match: BipartiteMatch, x: torch.Tensor, size: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: a token standing for s patches counts s times.

    Returns the merged ``x: [B, N - r, C]`` and the new ``size: [B, N - r, 1]`` (sizes add up).
    """
    return weighted_merge(x, size, match.protected, match.unm_idx, match.src_idx, match.dst_idx)


def initial_source(batch: int, num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[B, N, N] identity: each token stands for itself."""
    return torch.eye(num_tokens, device=device, dtype=dtype).expand(batch, -1, -1)


def merge_source(match: BipartiteMatch, source: torch.Tensor) -> torch.Tensor:
    """Track which input tokens each token stands for: ``source: [B, N, N_in]`` of 0/1 (a token's
    row is the union, the maximum, of its group's rows)."""
    return amax_merge(source, match.protected, match.unm_idx, match.src_idx, match.dst_idx)
