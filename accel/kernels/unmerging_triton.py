"""The Triton kernel of ``unmerging.unmerge`` and ``unmerging.unmerge2d``, a plain function that
``KernelOp`` wraps with ``triton.jit``. No ``from __future__ import annotations`` here: Triton reads
the ``tl.constexpr`` annotations."""
import triton.language as tl

__all__ = ["unmerge_kernel"]


def unmerge_kernel(x_ptr, a_ptr, b_ptr, unm_ptr, src_ptr, dst_ptr, out_ptr,
                   num_merged, num_tokens, channels, protected, num_unm, num_src,
                   GRID: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (image, ``ROWS`` output tokens), each a copy of one merged row (no arithmetic:
    bit-equal). Item ``k`` walks the merged layout with the merged-away sources inserted:
    protected tokens, kept A tokens, merged A tokens (each reading its destination), B tokens; its
    output position is the token's place in the input sequence, ``protected + 2i`` / ``+ 2j + 1``
    (``GRID``: the positions ``a_ptr[i]`` / ``b_ptr[j]``, shared by the batch)."""
    batch = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    live = k < num_tokens
    is_unm = (k >= protected) & (k < protected + num_unm)
    is_src = (k >= protected + num_unm) & (k < protected + num_unm + num_src)
    is_a = is_unm | is_src
    is_b = live & (k >= protected + num_unm + num_src)
    s = k - protected - num_unm  # index into src_idx/dst_idx
    j = s - num_src  # B index
    i = tl.load(unm_ptr + batch * num_unm + (k - protected), mask=is_unm, other=0)
    i = tl.where(is_src, tl.load(src_ptr + batch * num_src + s, mask=is_src, other=0), i)
    dst = tl.load(dst_ptr + batch * num_src + s, mask=is_src, other=0)
    # the merged row read: itself for protected and kept tokens, its destination for a merged source
    row = tl.where(is_src, protected + num_unm + dst, tl.where(is_b, k - num_src, k))
    if GRID:
        a_pos = tl.load(a_ptr + i, mask=is_a, other=0)
        b_pos = tl.load(b_ptr + j, mask=is_b, other=0)
    else:
        a_pos = protected + 2 * i
        b_pos = protected + 2 * j + 1
    pos = tl.where(is_a, a_pos, tl.where(is_b, b_pos, k))
    chans = tl.arange(0, BLOCK_C)
    mask = live[:, None] & (chans < channels)[None, :]
    values = tl.load(x_ptr + (batch * num_merged + row[:, None].to(tl.int64)) * channels + chans[None, :], mask=mask)
    tl.store(out_ptr + (batch * num_tokens + pos[:, None].to(tl.int64)) * channels + chans[None, :], values, mask=mask)
