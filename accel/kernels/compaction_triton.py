"""The Triton kernels of ``compaction`` (gather, scatter-back, masked compaction of token rows), plain
functions that ``KernelOp`` wraps with ``triton.jit``. No ``from __future__ import annotations``
here: Triton reads the ``tl.constexpr`` annotations.

Each program copies a tile of ``BLOCK_R`` rows x ``BLOCK_C`` channels: rows are tokens (or whole
images flattened to one row), each with its own source row, so a tile is ``BLOCK_R`` independent
contiguous copies. Rows are counted in int64 (a batch of long rows passes 2^31 elements).
"""
import triton.language as tl

__all__ = ["gather_tokens_kernel", "scatter_tokens_kernel", "compact_tokens_kernel"]


def gather_tokens_kernel(x_ptr, index_ptr, out_ptr, rows, out_tokens, protected, num_index, channels,
                         stride_xb, stride_xn, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output row ``b * (P + K) + t``: ``x[b, t]`` for ``t < P``, else ``x[b, P + index[b, t - P]]``."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = r < rows
    b, t = r // out_tokens, r % out_tokens
    picked = t >= protected
    j = tl.load(index_ptr + b * num_index + (t - protected), mask=live & picked, other=0)
    token = tl.where(picked, protected + j, t)
    tile = live[:, None] & (chans < channels)[None, :]
    values = tl.load(x_ptr + (b * stride_xb + token * stride_xn)[:, None] + chans[None, :], mask=tile)
    tl.store(out_ptr + r[:, None] * channels + chans[None, :], values, mask=tile)


def scatter_tokens_kernel(base_ptr, slot_ptr, src_ptr, out_ptr, rows, tokens, channels,
                          stride_ab, stride_an, stride_sb, stride_sn, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output row ``b * N + n``: ``src[b, slot[b, n]]`` where a source lands there (``slot >= 0``),
    else ``base[b, n]``. Each output row is read from one place and written once: no atomics, no
    copy of ``base`` first."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = r < rows
    b, n = r // tokens, r % tokens
    j = tl.load(slot_ptr + r, mask=live, other=-1)
    from_src = j >= 0
    tile = live[:, None] & (chans < channels)[None, :]
    kept = tl.load(base_ptr + (b * stride_ab + n * stride_an)[:, None] + chans[None, :],
                   mask=tile & ~from_src[:, None])
    new = tl.load(src_ptr + (b * stride_sb + j * stride_sn)[:, None] + chans[None, :], mask=tile & from_src[:, None])
    tl.store(out_ptr + r[:, None] * channels + chans[None, :], tl.where(from_src[:, None], new, kept), mask=tile)


def compact_tokens_kernel(x_ptr, keep_ptr, ends_ptr, out_ptr, index_ptr, rows, tokens, count, channels,
                          stride_xb, stride_xn, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Input row ``b * N + n`` with ``keep`` set goes to packed row ``dest = ends - 1`` (``ends``: the
    inclusive prefix sum of ``keep``, so ``dest`` counts the kept rows before it), and its flat
    position ``b * N + n`` to ``index[dest]``; nothing is written at or past ``count`` (a caller's
    wrong count truncates, it never writes out of bounds)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = r < rows
    kept = tl.load(keep_ptr + r, mask=live, other=0) != 0
    dest = tl.load(ends_ptr + r, mask=live, other=0) - 1
    write = live & kept & (dest < count)
    b, n = r // tokens, r % tokens
    tile = write[:, None] & (chans < channels)[None, :]
    values = tl.load(x_ptr + (b * stride_xb + n * stride_xn)[:, None] + chans[None, :], mask=tile)
    tl.store(out_ptr + dest[:, None] * channels + chans[None, :], values, mask=tile)
    tl.store(index_ptr + dest, r, mask=write & (tl.program_id(1) == 0))
