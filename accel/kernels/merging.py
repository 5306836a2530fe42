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

The plain (unweighted) merges, each a public function behind the dispatcher:

    x = mean_merge(x, protected, unm_idx, src_idx, dst_idx)              # BipartiteMatch.merge, mode "mean"
    source = amax_merge(source, protected, unm_idx, src_idx, dst_idx)    # source tracing (mode "amax")
    x = mean_merge2d(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)         # ToMe-SD's grid (GridMatch.merge)

The references are the torch ops the ToMe code ran (gathers, a scatter-reduce, a concatenation);
the kernel (one for the three) is one launch with the same fixed order of sources, fp32
accumulation and one rounding at the end: the mean is bit-equal in fp32 (the reference's sums in
the reference's order, then one division), the maximum in every dtype.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .dispatch import select
from .registration import KernelOp

__all__ = ["weighted_merge", "weighted_merge_reference", "weighted_merge_triton", "mean_merge", "amax_merge", "mean_merge2d",
           "merge_reference", "merge2d_reference", "mean_merge_triton", "amax_merge_triton", "mean_merge2d_triton"]

ROWS = 4  # output rows per program of the plain merges: a [4, BLOCK_C] tile


def expand_rows(index: torch.Tensor, channels: int) -> torch.Tensor:
    """Token indices ``[B, K]`` -> ``[B, K, channels]``, for gather/scatter along the tokens (also
    used by ``unmerging`` and ``compaction``)."""
    return index.unsqueeze(-1).expand(-1, -1, channels)


def weighted_merge_reference(x: torch.Tensor, size: torch.Tensor, protected: int, unm_idx: torch.Tensor,
                             src_idx: torch.Tensor, dst_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, in ``x``'s dtype."""
    merged = merge_reference(x * size, protected, unm_idx, src_idx, dst_idx, mode="sum")
    size = merge_reference(size, protected, unm_idx, src_idx, dst_idx, mode="sum")
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


# -- the plain (unweighted) merges ------------------------------------------------------------------
def merge_reference(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                    dst_idx: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Plain torch: ``[B, N, C] -> [B, N - r, C]``, merged tokens reduced with ``mode`` (sum, mean, amax)."""
    head, rest = x[:, :protected], x[:, protected:]
    a, b = rest[:, ::2], rest[:, 1::2]
    c = x.shape[-1]
    unm = a.gather(1, expand_rows(unm_idx, c))
    src = a.gather(1, expand_rows(src_idx, c))
    b = b.scatter_reduce(1, expand_rows(dst_idx, c), src, reduce=mode, include_self=True)
    return torch.cat([head, unm, b], dim=1)


def merge2d_reference(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                      src_idx: torch.Tensor, dst_idx: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Plain torch: ``[B, N, C] -> [B, N - r, C]`` (kept sources, then destinations), the sources and
    destinations at the grid positions ``a_idx``/``b_idx: [1, *]``."""
    batch, _, c = x.shape
    a = x.gather(1, expand_rows(a_idx.expand(batch, -1), c))
    b = x.gather(1, expand_rows(b_idx.expand(batch, -1), c))
    unm = a.gather(1, expand_rows(unm_idx, c))
    src = a.gather(1, expand_rows(src_idx, c))
    b = b.scatter_reduce(1, expand_rows(dst_idx, c), src, reduce=mode, include_self=True)
    return torch.cat([unm, b], dim=1)


def _segments(dst_idx: torch.Tensor, num_b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sources by destination without a host sync: ``order [B, r]`` (a stable sort of ``dst_idx``:
    ties in matching order) and ``bounds [B, Nb + 1]``, destination ``j``'s segment of ``order`` being
    ``bounds[j]:bounds[j + 1]``."""
    # A radix sort's passes follow the key's width, so the keys are narrowed: on an H100 the sort of
    # [2, 8192] int64 keys took 56 us, more than the merge kernel (23 us); int16 not measured yet.
    keys = dst_idx.to(torch.int16 if num_b < 2 ** 15 else torch.int32)
    ordered, order = keys.sort(dim=1, stable=True)
    wanted = torch.arange(num_b + 1, device=dst_idx.device, dtype=keys.dtype).expand(dst_idx.shape[0], -1)
    return order, torch.searchsorted(ordered, wanted.contiguous())


def _merge_kernel() -> Any:
    from .merging_triton import merge_kernel

    return merge_kernel


def _run_merge(op: KernelOp, x: torch.Tensor, a_idx: Optional[torch.Tensor], b_idx: Optional[torch.Tensor],
               protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
               mean: bool) -> torch.Tensor:
    import triton

    batch, n, c = x.shape
    num_unm, r = unm_idx.shape[1], src_idx.shape[1]
    num_b = n - protected - num_unm - r
    order, bounds = _segments(dst_idx, num_b)
    out = x.new_empty(batch, n - r, c)
    unm_idx, src_idx = unm_idx.contiguous(), src_idx.contiguous()
    grid_layout = a_idx is not None
    a_idx = a_idx.contiguous() if grid_layout else unm_idx  # unread without the grid layout
    b_idx = b_idx.contiguous() if grid_layout else unm_idx
    op.jit()[(batch, triton.cdiv(n - r, ROWS))](
        x.contiguous(), a_idx, b_idx, unm_idx, bounds, order, src_idx, out, n, c, protected, num_unm, num_b, r,
        GRID=grid_layout, MEAN=mean, ROWS=ROWS, BLOCK_C=triton.next_power_of_2(c))
    return out


def _launch_mean(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                 dst_idx: torch.Tensor) -> torch.Tensor:
    return _run_merge(_MEAN, x, None, None, protected, unm_idx, src_idx, dst_idx, True)


def _launch_amax(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                 dst_idx: torch.Tensor) -> torch.Tensor:
    return _run_merge(_AMAX, x, None, None, protected, unm_idx, src_idx, dst_idx, False)


def _fake_merge(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                dst_idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] - src_idx.shape[1], x.shape[2])


def _launch_mean2d(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                   src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    return _run_merge(_MEAN2D, x, a_idx, b_idx, 0, unm_idx, src_idx, dst_idx, True)


def _fake_merge2d(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                  src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] - src_idx.shape[1], x.shape[2])


_MEAN = KernelOp("mean_merge", _merge_kernel, _launch_mean, _fake_merge)
_AMAX = KernelOp("amax_merge", _merge_kernel, _launch_amax, _fake_merge)
_MEAN2D = KernelOp("mean_merge2d", _merge_kernel, _launch_mean2d, _fake_merge2d)


def mean_merge_triton(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                      dst_idx: torch.Tensor) -> torch.Tensor:
    """The one-launch kernel (after the sort of the destinations): fp32 sums, one rounding."""
    return _MEAN(x, protected, unm_idx, src_idx, dst_idx)


def amax_merge_triton(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                      dst_idx: torch.Tensor) -> torch.Tensor:
    """The one-launch kernel, each destination the elementwise maximum of its group (exact)."""
    return _AMAX(x, protected, unm_idx, src_idx, dst_idx)


def mean_merge2d_triton(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                        src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """The one-launch kernel on the grid layout."""
    return _MEAN2D(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)


def check_match(op: str, x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
                ) -> None:
    """A ``ValueError`` naming the argument unless ``x`` is ``[B, N, C]`` and the indices int64 ``[B, *]``
    with ``src_idx`` and ``dst_idx`` of one shape (also for ``unmerging``)."""
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be [B, N, C]; got shape {tuple(x.shape)}")
    for name, index in (("unm_idx", unm_idx), ("src_idx", src_idx), ("dst_idx", dst_idx)):
        if index.ndim != 2 or index.shape[0] != x.shape[0] or index.dtype != torch.int64:
            raise ValueError(f"{op}: {name} must be int64 [B, *] with B = {x.shape[0]}; got "
                             f"{index.dtype} {tuple(index.shape)}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"{op}: src_idx and dst_idx must have one shape; got {tuple(src_idx.shape)} and "
                         f"{tuple(dst_idx.shape)}")


def _check(op: str, x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
           num_a: int) -> None:
    check_match(op, x, unm_idx, src_idx, dst_idx)
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point; got {x.dtype}")
    if unm_idx.shape[1] + src_idx.shape[1] != num_a:
        raise ValueError(f"{op}: unm_idx and src_idx must split the {num_a} A tokens; got "
                         f"{unm_idx.shape[1]} + {src_idx.shape[1]}")


def _check_prefix(op: str, x: torch.Tensor, protected: int) -> int:
    """The number of A tokens after ``protected`` tokens (the even positions of the rest)."""
    if not 0 <= protected <= x.shape[1]:
        raise ValueError(f"{op}: protected must be in [0, {x.shape[1]}]; got {protected}")
    return (x.shape[1] - protected + 1) // 2


def mean_merge(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
               *, backend: Optional[str] = None) -> torch.Tensor:
    """Unweighted ToMe merge of ``x: [B, N, C]`` by a bipartite matching (``unm_idx [B, Na - r]``,
    ``src_idx``/``dst_idx [B, r]``, A tokens at the even positions after ``protected`` tokens, B at
    the odd): ``[B, N - r, C]``, each B token the mean of itself and the A tokens merged into it."""
    _check("mean_merge", x, unm_idx, src_idx, dst_idx, _check_prefix("mean_merge", x, protected))
    if select("mean_merge", x, backend) == "triton":
        return mean_merge_triton(x, protected, unm_idx, src_idx, dst_idx)
    return merge_reference(x, protected, unm_idx, src_idx, dst_idx, "mean")


def amax_merge(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
               *, backend: Optional[str] = None) -> torch.Tensor:
    """``mean_merge`` with the elementwise maximum: source tracing, ``x`` a 0/1 matrix ``[B, N, N_in]``
    of which input tokens each token stands for."""
    _check("amax_merge", x, unm_idx, src_idx, dst_idx, _check_prefix("amax_merge", x, protected))
    if select("amax_merge", x, backend) == "triton":
        return amax_merge_triton(x, protected, unm_idx, src_idx, dst_idx)
    return merge_reference(x, protected, unm_idx, src_idx, dst_idx, "amax")


def mean_merge2d(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                 src_idx: torch.Tensor, dst_idx: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """ToMe-SD's merge of ``x: [B, N, C]`` on the grid: sources at ``a_idx [1, Na]``, destinations at
    ``b_idx [1, Nb]`` (shared by the batch): ``[B, N - r, C]``, the kept sources (``unm_idx`` order),
    then each destination the mean of itself and the sources merged into it (paper, Sec. 4)."""
    for name, index in (("a_idx", a_idx), ("b_idx", b_idx)):
        if index.ndim != 2 or index.shape[0] != 1 or index.dtype != torch.int64:
            raise ValueError(f"mean_merge2d: {name} must be int64 [1, *] (shared by the batch); got "
                             f"{index.dtype} {tuple(index.shape)}")
    if x.ndim == 3 and a_idx.shape[1] + b_idx.shape[1] != x.shape[1]:
        raise ValueError(f"mean_merge2d: a_idx and b_idx must split the {x.shape[1]} tokens; got "
                         f"{a_idx.shape[1]} + {b_idx.shape[1]}")
    _check("mean_merge2d", x, unm_idx, src_idx, dst_idx, a_idx.shape[1])
    if select("mean_merge2d", x, backend) == "triton":
        return mean_merge2d_triton(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)
    return merge2d_reference(x, a_idx, b_idx, unm_idx, src_idx, dst_idx, "mean")


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
