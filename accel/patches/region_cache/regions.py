"""Which tokens a cached step recomputes (after RAS, Liu et al. 2025): scores per patch token from
the model output, regions of ``window x window`` tokens, the top regions by score. Tensors only.

Everything stays on the device and has shapes fixed by the settings (no host sync), so a
compiled model sees the same shapes on every cached step.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["token_scores", "region_ids", "select_tokens", "token_mask", "pixel_mask"]


def _patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """x: [B, C, H, W] -> [B, N, patch*patch*C], tokens row-major as the DiT patch embedding orders them."""
    b, c, height, width = x.shape
    h, w = height // patch, width // patch
    x = x[:, :, : h * patch, : w * patch].reshape(b, c, h, patch, w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch * patch * c)


def token_scores(output: torch.Tensor, previous: Optional[torch.Tensor], patch: int, metric: str) -> torch.Tensor:
    """Focus score of each patch token: output, previous: [B, C, H, W] -> [B, N] float32.

    ``delta``: ||output - previous|| over the patch's values; ``std``/``l2norm``: the standard
    deviation / norm of the patch's output values (RAS scores the predicted noise with either).
    """
    out = _patches(output.float(), patch)
    if metric == "delta":
        return (out - _patches(previous.float(), patch)).norm(dim=-1)
    if metric == "std":
        return out.std(dim=-1)
    return out.norm(dim=-1)


def region_ids(h: int, w: int, window: int, device: torch.device) -> torch.Tensor:
    """Region of each token of an ``h x w`` grid: [N] long, regions row-major; edge regions may be smaller."""
    rows = torch.arange(h, device=device) // window
    cols = torch.arange(w, device=device) // window
    per_row = -(-w // window)
    return (rows[:, None] * per_row + cols[None, :]).reshape(-1)


def select_tokens(scores: torch.Tensor, regions: torch.Tensor, num_regions: int, count: int) -> torch.Tensor:
    """The ``count`` tokens of the highest-scoring regions: scores [B, N], regions [N] -> [B, count] sorted.

    A region's score is the mean of its tokens' scores. Regions are taken whole in descending
    score (ties: lower region id first), the last one partly (its lowest token ids) when
    ``count`` ends inside it, so exactly ``count`` tokens are computed on every cached step.
    """
    batch, n = scores.shape
    index = regions.expand(batch, n)
    total = scores.new_zeros(batch, num_regions).scatter_add_(1, index, scores)
    sizes = scores.new_zeros(num_regions).scatter_add_(0, regions, torch.ones_like(regions, dtype=scores.dtype))
    order = torch.argsort(total / sizes, dim=1, descending=True, stable=True)  # [B, R] regions by score
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_regions, device=scores.device).expand(batch, -1))
    key = rank.gather(1, index) * n + torch.arange(n, device=scores.device)  # region rank first, token id next
    chosen = torch.argsort(key, dim=1)[:, :count]
    return chosen.sort(dim=1).values


def token_mask(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """chosen: [B, k] token ids -> [B, N] bool, True where computed."""
    return torch.zeros(chosen.shape[0], n, dtype=torch.bool, device=chosen.device).scatter_(1, chosen, True)


def pixel_mask(mask: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """mask: [B, N] -> [B, 1, h*patch, w*patch], each token's patch of the latent."""
    grid = mask.reshape(-1, 1, h, w)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
