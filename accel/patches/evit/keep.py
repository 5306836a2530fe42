"""EViT's token reorganisation on tensors: keep the attentive tokens, fuse the rest (Liang et al.,
ICLR 2022, Sec. 3.2-3.3). Knows tensors only.

Shapes: ``x: [B, N, C]`` with ``num_prefix`` prefix tokens first (CLS at 0, then registers or a
distillation token); per-head ``q, k: [B, H, N, head_dim]``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ...kernels import gather_tokens

__all__ = ["cls_attention", "num_kept", "keep_and_fuse"]


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The CLS token's attention to every token, averaged over heads: ``[B, N]``.

    SDPA does not return its weights, so the one row the method needs (query 0, the CLS
    token) is computed again: ``softmax(q_0 k^T * scale)`` per head, then the head mean (the
    paper's attentiveness, Eq. 2). The softmax runs in float32 for bf16/fp16 inputs.
    """
    logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * scale  # [B, H, N]
    return logits.float().softmax(dim=-1).mean(dim=1)


def num_kept(keep_rate: float, candidates: int) -> int:
    """``ceil(keep_rate * candidates)`` (at least 1), robust to 0.7 * 10 = 7.000000000000001."""
    return max(1, min(candidates, math.ceil(round(keep_rate * candidates, 6))))


def keep_and_fuse(x: torch.Tensor, attn: torch.Tensor, keep: int, num_prefix: int,
                  fuse: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` non-prefix tokens of ``x: [B, N, C]`` with the highest ``attn: [B, N]``
    and fuse the others into one token appended at the end.

    The kept tokens stay in their original order. The fused token is the attention-weighted
    average of the inattentive tokens, ``sum_i a_i x_i / sum_i a_i`` (Eq. 3, normalised so it
    stays on the scale of a token). Returns ``x' : [B, P + keep (+1), C]`` and the kept
    positions ``[B, keep]`` (indices into ``x``).
    """
    n = x.shape[1]
    patches, scores = x[:, num_prefix:], attn[:, num_prefix:]
    kept = scores.topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep]
    out = gather_tokens(x, kept, num_prefix)  # [B, P + keep, C]: the prefix, then the kept tokens
    if fuse and keep < n - num_prefix:
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, kept, False)
        weights = (scores * dropped).to(x.dtype).unsqueeze(-1)  # zero on the kept tokens
        total = weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        out = torch.cat([out, (patches * weights).sum(dim=1, keepdim=True) / total], dim=1)
    return out, kept + num_prefix
