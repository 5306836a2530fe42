"""Size-weighted merging of matched tokens (ToMe, Bolya et al. 2023, Sec. 3: a token standing for s
patches counts s times; sizes add up).

    x, size = weighted_merge(x, size, protected, unm_idx, src_idx, dst_idx)
    # x [B, N, C], size [B, N, 1] -> [B, N - r, C], [B, N - r, 1]

Output order: the ``protected`` tokens, the unmerged A tokens (A: even positions after them) in
``unm_idx`` order, then the B tokens (odd positions), each the size-weighted mean of itself and the
A tokens merged into it. The reference takes eight torch ops (multiply, two gathers and a
scatter-reduce for x and again for the sizes, two concatenations, a divide); the Triton kernel is one
launch writing x and size together, its sums in a fixed order (the sources sorted by destination,
ties kept in their order), so it is deterministic: no atomics.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from .registration import KernelOp

__all__ = ["weighted_merge_reference", "weighted_merge_triton"]


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def _merge_sum(t: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
               dst_idx: torch.Tensor) -> torch.Tensor:
    head, rest = t[:, :protected], t[:, protected:]
    a, b = rest[:, ::2], rest[:, 1::2]
    c = t.shape[-1]
    unm = a.gather(1, _expand(unm_idx, c))
    src = a.gather(1, _expand(src_idx, c))
    b = b.scatter_reduce(1, _expand(dst_idx, c), src, reduce="sum", include_self=True)
    return torch.cat([head, unm, b], dim=1)


def weighted_merge_reference(x: torch.Tensor, size: torch.Tensor, protected: int, unm_idx: torch.Tensor,
                             src_idx: torch.Tensor, dst_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, in ``x``'s dtype."""
    merged = _merge_sum(x * size, protected, unm_idx, src_idx, dst_idx)
    size = _merge_sum(size, protected, unm_idx, src_idx, dst_idx)
    return merged / size, size


def _kernel() -> Any:
    from .merging_triton import weighted_merge_kernel

    return weighted_merge_kernel


def _launch(x: torch.Tensor, size: torch.Tensor, protected: int, unm_idx: torch.Tensor,
            src_idx: torch.Tensor, dst_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    import triton

    batch, n, c = x.shape
    num_b, r = (n - protected) // 2, src_idx.shape[1]
    # Each B token's sources as one segment of the sources sorted by destination (stable: in their
    # order), found without a host sync: counts by scatter-add, starts by a cumulative sum.
    order = dst_idx.argsort(dim=1, stable=True)
    sources = src_idx.gather(1, order).contiguous()
    count = torch.zeros(batch, num_b, dtype=torch.int64, device=x.device).scatter_add_(
        1, dst_idx, torch.ones_like(dst_idx))
    start = count.cumsum(1) - count
    out = x.new_empty(batch, n - r, c)
    out_size = size.new_empty(batch, n - r, 1)
    _OP.jit()[(batch, n - r)](x.contiguous(), size.contiguous(), unm_idx.contiguous(), start, count, sources,
                           out, out_size, n, c, protected, unm_idx.shape[1], num_b, r,
                           BLOCK_C=triton.next_power_of_2(c))
    return out, out_size


def _fake(x: torch.Tensor, size: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
          dst_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[1] - src_idx.shape[1]
    return x.new_empty(x.shape[0], n, x.shape[2]), size.new_empty(x.shape[0], n, 1)


_OP = KernelOp("weighted_merge", _kernel, _launch, _fake)


def weighted_merge_triton(x: torch.Tensor, size: torch.Tensor, protected: int, unm_idx: torch.Tensor,
                          src_idx: torch.Tensor, dst_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel: fp32 accumulation, outputs in the inputs' dtypes."""
    return _OP(x, size, protected, unm_idx, src_idx, dst_idx)
