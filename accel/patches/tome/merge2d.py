"""Token merging on a 2D latent grid, for diffusion models. Tensors in, tensors out: no framework here.

Two ways to make attention over the ``h x w`` latent tokens cheaper:

- **merge** (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", 2023, Sec. 4): bipartite
  soft matching whose destinations are spread over the image, one per ``sx x sy`` window, so
  merging never collapses a whole region; the rest are sources. Each source finds its most
  similar destination (cosine similarity); the ``r`` best-matched sources are averaged into their
  destinations. After the op, ``unmerge`` gives every merged source its destination's value back,
  so the block's output keeps all ``h * w`` tokens.
- **downsample** (Smith et al., "ToDo: Token Downsampling", 2024): keys and values of self-attention
  come from the grid subsampled by ``factor``; the queries stay, so nothing needs unmerging.

Tokens are in raster order (row-major over ``h x w``), as diffusers flattens latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ...kernels import mean_merge2d, unmerge2d
from ...kernels.merging import merge2d_reference
from .merge import match_sets

__all__ = ["GridMatch", "grid_destinations", "bipartite_soft_matching_random2d", "downsample_tokens"]


def _expand(index: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    return index.expand(batch, -1).unsqueeze(-1).expand(-1, -1, channels)


@dataclass
class GridMatch:
    """One matching of a batch of ``N = h * w`` tokens.

    a_idx: [1, Na] grid positions of the sources; b_idx: [1, Nb] of the destinations (shared
    by the batch). unm_idx: [B, Na - r] sources kept; src_idx: [B, r] sources merged away;
    dst_idx: [B, r] the destination (index into b_idx) each merges into.
    """

    num_tokens: int
    a_idx: torch.Tensor
    b_idx: torch.Tensor
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """``[B, N, C] -> [B, N - r, C]``: kept sources, then destinations (with their merged sources)."""
        args = (self.a_idx, self.b_idx, self.unm_idx, self.src_idx, self.dst_idx)
        if mode == "mean":  # paper, Sec. 4: merged tokens are averaged (no size weighting: unmerged right after)
            return mean_merge2d(x, *args)
        return merge2d_reference(x, *args, mode=mode)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N - r, C] -> [B, N, C]``: each merged source takes its destination's value."""
        return unmerge2d(x, self.a_idx, self.b_idx, self.unm_idx, self.src_idx, self.dst_idx)


def grid_destinations(h: int, w: int, sx: int, sy: int, generator: Optional[torch.Generator] = None,
                      no_rand: bool = False, device: Optional[torch.device] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the ``h x w`` grid into sources ``a_idx: [1, Na]`` and destinations ``b_idx: [1, Nb]``.

    One destination per full ``sx x sy`` window: at a random offset drawn from ``generator``
    (the global RNG when None), or the window's top-left token when ``no_rand``. Tokens outside
    the full windows (``h % sy`` last rows, ``w % sx`` last columns) are sources. Both index
    lists are in raster order.
    """
    hsy, wsx = h // sy, w // sx
    n = h * w
    if no_rand:
        offset = torch.zeros(hsy, wsx, dtype=torch.int64, device=device)
    else:
        gen_device = generator.device if generator is not None else device
        offset = torch.randint(sy * sx, (hsy, wsx), generator=generator, device=gen_device).to(device)
    rows = torch.arange(hsy, device=device)[:, None] * sy + offset // sx
    cols = torch.arange(wsx, device=device)[None, :] * sx + offset % sx
    is_dst = torch.zeros(n, dtype=torch.int8, device=device)
    is_dst[(rows * w + cols).flatten()] = 1
    # Stable sort of 0/1 flags: sources then destinations, each in raster order (no host sync).
    order = is_dst.sort(stable=True).indices
    num_dst = hsy * wsx
    return order[None, :n - num_dst], order[None, n - num_dst:]


def bipartite_soft_matching_random2d(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                                     generator: Optional[torch.Generator] = None,
                                     no_rand: bool = False) -> GridMatch:
    """Match ``r`` sources of ``metric: [B, h * w, C]`` to destinations on the grid (paper, Sec. 4.1).

    ``r`` is capped at the number of sources; with no full window there is nothing to match into
    and ``r`` is 0. The destinations are shared by the batch; the matching is per item.
    """
    batch, n, c = metric.shape
    if n != h * w:
        raise ValueError(f"bipartite_soft_matching_random2d: {n} tokens do not form a {h}x{w} grid")
    a_idx, b_idx = grid_destinations(h, w, sx, sy, generator, no_rand, metric.device)
    num_a, num_b = a_idx.shape[1], b_idx.shape[1]
    r = max(0, min(r, num_a)) if num_b else 0
    with torch.no_grad():
        if r == 0:
            unm_idx = torch.arange(num_a, device=metric.device).expand(batch, -1)
            empty = unm_idx[:, :0]
            return GridMatch(n, a_idx, b_idx, unm_idx, empty, empty)
        unm_idx, src_idx, dst_idx = match_sets(metric.gather(1, _expand(a_idx, batch, c)),
                                               metric.gather(1, _expand(b_idx, batch, c)), r)
    return GridMatch(n, a_idx, b_idx, unm_idx, src_idx, dst_idx)


def downsample_tokens(x: torch.Tensor, h: int, w: int, factor: int, method: str = "nearest") -> torch.Tensor:
    """``x: [B, h * w, C] -> [B, ceil(h / factor) * ceil(w / factor), C]`` on the latent grid (ToDo).

    ``nearest`` keeps every ``factor``-th token in each direction (a strided view: the keys and
    values stay actual tokens of the feature map); ``avg`` averages each ``factor x factor`` window
    (partial windows at the border average what they hold).
    """
    if factor == 1:
        return x
    batch, n, c = x.shape
    if n != h * w:
        raise ValueError(f"downsample_tokens: {n} tokens do not form a {h}x{w} grid")
    if method == "nearest":
        return x.reshape(batch, h, w, c)[:, ::factor, ::factor].reshape(batch, -1, c)
    if method == "avg":
        grid = x.transpose(1, 2).reshape(batch, c, h, w)
        pooled = F.avg_pool2d(grid, factor, stride=factor, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)
    raise ValueError(f"downsample_tokens: method must be 'nearest' or 'avg'; got {method!r}")
