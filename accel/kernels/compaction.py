"""Moving token rows for the methods that compute fewer tokens or images: gather, scatter back, and
masked compaction of a ragged batch into one packed list (issue 14).

    out = gather_tokens(x, index, protected)        # x [B, N, C], index [B, K] -> [B, P + K, C]
    out = scatter_tokens(base, index, src)          # base [B, N, C], src [B, K, C] -> [B, N, C]
    packed, flat = compact_tokens(x, mask, count)   # mask [B, N] -> [M, C] and [M] (b * N + n)

A flat list of rows (A-ViT's packed tokens ``[T, C]``, a batch of images ``[B, N * C]``) is the
case ``B = 1``: ``gather_tokens(rows[None], index[None])[0]``.

Who uses what: EViT keeps its attentive tokens (``gather_tokens`` with the prefix protected);
RegionCache gathers the chosen tokens and scatters them back (and into its attention context);
token exit gathers the queries, packs the active tokens (``compact_tokens``) and scatters them back;
A-ViT packs the tokens still active, and pads its packed list per image for attention and back;
early exit packs the images that leave and those that stay, and gathers the logits back to the
input order.

These are copies, so every backend gives the same bits. The references are the torch ops the
patches used before (gather, scatter, boolean indexing / nonzero); the Triton kernels copy tiles of
rows in one launch each: the scatter reads each output row from one place (``src`` where a source
lands, ``base`` elsewhere, from a ``[B, N]`` map of slots made by one small torch scatter) instead
of copying ``base`` and then overwriting, and the compaction finds each kept row's place by a prefix
sum of the mask on the device. Only a packed list's length is data-dependent: given ``count``,
neither backend reads anything back to the host; without it, ``compact_tokens`` counts the mask
(one host sync).

On an H100 (fp16, one call timed alone with its launches): bit-equal to the references, and
``torch.compile(fullgraph=True)`` traces through all three; at these sizes a call is bound by its
launches, not by memory (ViT-B batch 256: gather 0.17 ms against the reference's 0.23, scatter 0.24
against 0.16, compaction 0.29 against 0.15), so the gain is in the host syncs removed, not yet in
the copies.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .dispatch import select
from .merging import expand_rows
from .registration import KernelOp

__all__ = ["gather_tokens", "scatter_tokens", "compact_tokens", "gather_tokens_reference",
           "scatter_tokens_reference", "compact_tokens_reference", "gather_tokens_triton",
           "scatter_tokens_triton", "compact_tokens_triton"]

TILE = 4096  # elements one program copies: BLOCK_R rows x BLOCK_C channels
MAX_BLOCK_C = 1024  # longer rows (an image of N * C) are split over several programs


# -- references: the torch ops the patches used before ----------------------------------------------
def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor, protected: int = 0) -> torch.Tensor:
    """Plain torch: the prefix, then ``x[:, protected:]`` gathered along the tokens."""
    if protected == 0:
        return x.gather(1, expand_rows(index, x.shape[-1]))
    picked = x[:, protected:].gather(1, expand_rows(index, x.shape[-1]))
    return torch.cat([x[:, :protected], picked], dim=1)


def scatter_tokens_reference(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``base.scatter`` (out of place) along the tokens."""
    return base.scatter(1, expand_rows(index, base.shape[-1]), src)


def compact_tokens_reference(x: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the flat positions of the set entries (``nonzero``; ``nonzero_static`` when the
    count is given, so no host sync) and those rows of ``x`` (as ``x[mask]``)."""
    flat = mask.reshape(-1)
    where = flat.nonzero() if count is None else torch.nonzero_static(flat, size=count)
    index = where.squeeze(1)
    return x.flatten(0, 1)[index], index


# -- Triton ------------------------------------------------------------------------------------------
def _blocks(rows: int, channels: int) -> Tuple[int, int, Tuple[int, int]]:
    import triton

    block_c = min(triton.next_power_of_2(max(channels, 1)), MAX_BLOCK_C)
    block_r = min(max(1, TILE // block_c), triton.next_power_of_2(max(rows, 1)))
    return block_r, block_c, (triton.cdiv(rows, block_r), triton.cdiv(channels, block_c))


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch and token strides; channels must be adjacent."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _gather_kernel() -> Any:
    from .compaction_triton import gather_tokens_kernel

    return gather_tokens_kernel


def _gather_launch(x: torch.Tensor, index: torch.Tensor, protected: int) -> torch.Tensor:
    batch, _, channels = x.shape
    out_tokens = protected + index.shape[1]
    out = x.new_empty(batch, out_tokens, channels)
    if out.numel() == 0:
        return out
    x, index = _rows_contiguous(x), index.contiguous()
    block_r, block_c, grid = _blocks(batch * out_tokens, channels)
    _GATHER.jit()[grid](x, index, out, batch * out_tokens, out_tokens, protected, index.shape[1], channels,
                        x.stride(0), x.stride(1), BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _gather_fake(x: torch.Tensor, index: torch.Tensor, protected: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], protected + index.shape[1], x.shape[2])


def _scatter_kernel() -> Any:
    from .compaction_triton import scatter_tokens_kernel

    return scatter_tokens_kernel


def _scatter_launch(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    batch, tokens, channels = base.shape
    out = base.new_empty(base.shape)
    if out.numel() == 0:
        return out
    # which source row lands on each output row (-1: none, keep base's): a [B, N] map, so every output
    # row is read from one place and written once
    count = index.shape[1]
    slot = torch.full((batch, tokens), -1, dtype=torch.int64, device=base.device)
    slot.scatter_(1, index, torch.arange(count, device=base.device).expand(batch, count))
    base, src = _rows_contiguous(base), _rows_contiguous(src)
    block_r, block_c, grid = _blocks(batch * tokens, channels)
    _SCATTER.jit()[grid](base, slot, src, out, batch * tokens, tokens, channels, base.stride(0), base.stride(1),
                         src.stride(0), src.stride(1), BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _scatter_fake(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return base.new_empty(base.shape)


def _compact_kernel() -> Any:
    from .compaction_triton import compact_tokens_kernel

    return compact_tokens_kernel


def _compact_launch(x: torch.Tensor, mask: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, channels = x.shape
    out = x.new_empty(count, channels)
    index = torch.empty(count, dtype=torch.int64, device=x.device)
    if count == 0 or channels == 0:
        if count and not channels:  # rows without channels still have positions
            index = compact_tokens_reference(x, mask, count)[1]
        return out, index
    keep = mask.reshape(-1).contiguous()
    ends = keep.cumsum(0)  # int64: each kept row's place in the packed list (plus one), found on the device
    x = _rows_contiguous(x)
    block_r, block_c, grid = _blocks(batch * tokens, channels)
    _COMPACT.jit()[grid](x, keep, ends, out, index, batch * tokens, tokens, count, channels, x.stride(0),
                         x.stride(1), BLOCK_R=block_r, BLOCK_C=block_c)
    return out, index


def _compact_fake(x: torch.Tensor, mask: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(count, x.shape[2]), x.new_empty(count, dtype=torch.int64)


_GATHER = KernelOp("gather_tokens", _gather_kernel, _gather_launch, _gather_fake)
_SCATTER = KernelOp("scatter_tokens", _scatter_kernel, _scatter_launch, _scatter_fake)
_COMPACT = KernelOp("compact_tokens", _compact_kernel, _compact_launch, _compact_fake)


def gather_tokens_triton(x: torch.Tensor, index: torch.Tensor, protected: int = 0) -> torch.Tensor:
    """The kernel: one launch copying the prefix and the gathered rows."""
    return _GATHER(x, index, protected)


def scatter_tokens_triton(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The kernel: each output row read once, from ``src`` or ``base``."""
    return _SCATTER(base, index, src)


def compact_tokens_triton(x: torch.Tensor, mask: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel: places by a prefix sum on the device, ``count`` rows written."""
    return _COMPACT(x, mask, count)


# -- the public functions -----------------------------------------------------------------------------
def _check_index(op: str, index: torch.Tensor, batch: int, device: torch.device) -> None:
    if index.ndim != 2 or index.shape[0] != batch or index.dtype != torch.int64:
        raise ValueError(f"{op}: index must be an int64 [B, K] tensor with B={batch}; got {index.dtype} "
                         f"{tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{op}: index is on {index.device}, the tokens on {device}")


def gather_tokens(x: torch.Tensor, index: torch.Tensor, protected: int = 0, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """The first ``protected`` tokens of ``x: [B, N, C]``, then the tokens ``index: [B, K]`` (int64,
    positions among ``x[:, protected:]``, in ``index``'s order): ``[B, protected + K, C]``. Indices
    must be in range (not checked on the device, as torch's own gather on CUDA)."""
    if x.ndim != 3:
        raise ValueError(f"gather_tokens: x must be [B, N, C]; got {tuple(x.shape)}")
    _check_index("gather_tokens", index, x.shape[0], x.device)
    if isinstance(protected, bool) or not isinstance(protected, int) or not 0 <= protected <= x.shape[1]:
        raise ValueError(f"gather_tokens: protected must be an int in [0, N={x.shape[1]}]; got {protected!r}")
    if select("gather_tokens", x, backend) == "triton":
        return gather_tokens_triton(x, index, protected)
    return gather_tokens_reference(x, index, protected)


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """A copy of ``base: [B, N, C]`` with token ``index[b, j]`` replaced by ``src[b, j]`` (``index:
    [B, K]`` int64, distinct within an image; ``src: [B, K, C]``, ``base``'s dtype): ``[B, N, C]``.
    ``base`` is not modified."""
    if base.ndim != 3:
        raise ValueError(f"scatter_tokens: base must be [B, N, C]; got {tuple(base.shape)}")
    _check_index("scatter_tokens", index, base.shape[0], base.device)
    if index.shape[1] > base.shape[1]:
        raise ValueError(f"scatter_tokens: index has {index.shape[1]} tokens per image, more than base's "
                         f"{base.shape[1]}")
    if src.shape != (*index.shape, base.shape[2]) or src.dtype != base.dtype or src.device != base.device:
        raise ValueError(f"scatter_tokens: src must be [B, K, C]={(*index.shape, base.shape[2])} in base's dtype "
                         f"{base.dtype} on {base.device}; got {src.dtype} {tuple(src.shape)} on {src.device}")
    # a forward-only kernel: the dispatcher gives autograd the reference when the tensor it sees needs a gradient
    if select("scatter_tokens", src if src.requires_grad else base, backend) == "triton":
        return scatter_tokens_triton(base, index, src)
    return scatter_tokens_reference(base, index, src)


def compact_tokens(x: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None, *,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tokens of ``x: [B, N, C]`` where ``mask: [B, N]`` (bool) is set, packed in (image, token)
    order: ``[M, C]`` (as ``x[mask]``), and their flat positions ``b * N + n``: ``[M]`` int64, the
    index to scatter them back (``scatter_tokens(x.flatten(0, 1)[None], index[None], packed[None])``).

    ``count`` is ``M``, the number of set entries, when the caller knows it; the list's length
    depends on the data, so without it the mask is counted on the host (one sync). A wrong count
    gives a list cut short or padded, never a write out of bounds."""
    if x.ndim != 3:
        raise ValueError(f"compact_tokens: x must be [B, N, C]; got {tuple(x.shape)}")
    if mask.dtype != torch.bool or mask.shape != x.shape[:2] or mask.device != x.device:
        raise ValueError(f"compact_tokens: mask must be a bool [B, N]={tuple(x.shape[:2])} tensor on {x.device}; "
                         f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
    if count is not None and not isinstance(count, torch.SymInt) and (  # a SymInt: traced, its value unknown
            isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= mask.numel()):
        raise ValueError(f"compact_tokens: count must be None or an int in [0, B*N={mask.numel()}]; got {count!r}")
    if select("compact_tokens", x, backend) == "triton":
        if count is None:
            count = int(mask.sum())  # host sync: the packed list's length is data-dependent
        return compact_tokens_triton(x, mask, count)
    return compact_tokens_reference(x, mask, count)
