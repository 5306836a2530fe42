"""The Triton kernel of ``merging.weighted_merge``, a plain function that ``KernelOp`` wraps with
``triton.jit``. No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr``
annotations."""
import triton.language as tl

__all__ = ["weighted_merge_kernel", "merge_kernel"]


def weighted_merge_kernel(x_ptr, size_ptr, unm_ptr, start_ptr, count_ptr, src_ptr, out_ptr, out_size_ptr,
                          num_tokens, channels, protected, num_unm, num_b, num_src,
                          BLOCK_C: tl.constexpr):
    """One program per (image, output token): protected tokens and unmerged A tokens are copied
    (as x*s/s, the reference's arithmetic), a B token adds its sources, taken from its segment of the
    sources sorted by destination, in their original order: no atomics, the reference's sum order."""
    batch, t = tl.program_id(0), tl.program_id(1)
    chans = tl.arange(0, BLOCK_C)
    keep = chans < channels
    is_head = t < protected
    is_unm = (t >= protected) & (t < protected + num_unm)
    j = t - protected - num_unm  # the B index of a B output token
    a = tl.load(unm_ptr + batch * num_unm + (t - protected), mask=is_unm, other=0)
    token = tl.where(is_head, t, tl.where(is_unm, protected + 2 * a, protected + 2 * j + 1))
    x_row = x_ptr + (batch * num_tokens + token) * channels
    s = tl.load(size_ptr + batch * num_tokens + token).to(tl.float32)
    acc = tl.load(x_row + chans, mask=keep, other=0.0).to(tl.float32) * s
    total = s
    is_b = (~is_head) & (~is_unm)
    start = tl.load(start_ptr + batch * num_b + j, mask=is_b, other=0)
    count = tl.load(count_ptr + batch * num_b + j, mask=is_b, other=0)
    for k in range(start, start + count):
        source = protected + 2 * tl.load(src_ptr + batch * num_src + k)
        s_k = tl.load(size_ptr + batch * num_tokens + source).to(tl.float32)
        acc += tl.load(x_ptr + (batch * num_tokens + source) * channels + chans, mask=keep, other=0.0).to(tl.float32) * s_k
        total += s_k
    num_out = num_tokens - num_src
    tl.store(out_ptr + (batch * num_out + t) * channels + chans, (acc / total).to(out_ptr.dtype.element_ty), mask=keep)
    tl.store(out_size_ptr + batch * num_out + t, total.to(out_size_ptr.dtype.element_ty))


def merge_kernel(x_ptr, a_ptr, b_ptr, unm_ptr, bounds_ptr, order_ptr, src_ptr, out_ptr,
                 num_tokens, channels, protected, num_unm, num_b, num_src,
                 GRID: tl.constexpr, MEAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (image, ``ROWS`` output tokens), unweighted: protected and kept A tokens are
    copied, a B token reduces itself with its sources (sum, then ``MEAN``: divided by their number;
    else the maximum), taken in matching order from its segment ``bounds[j]:bounds[j + 1]`` of the
    sources sorted by destination (``src_ptr[order_ptr[k]]``): no atomics, the reference's order.
    Token positions: ``protected + 2i`` / ``+ 2j + 1``, or with ``GRID`` ``a_ptr[i]`` / ``b_ptr[j]``."""
    batch = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    num_out = num_tokens - num_src
    live = t < num_out
    is_head = t < protected
    is_unm = (t >= protected) & (t < protected + num_unm)
    is_b = live & (t >= protected + num_unm)
    j = t - protected - num_unm  # the B index of a B output token
    i = tl.load(unm_ptr + batch * num_unm + (t - protected), mask=is_unm, other=0)
    if GRID:
        a_pos = tl.load(a_ptr + i, mask=is_unm, other=0)
        b_pos = tl.load(b_ptr + j, mask=is_b, other=0)
    else:
        a_pos = protected + 2 * i
        b_pos = protected + 2 * j + 1
    token = tl.where(is_head, t, tl.where(is_unm, a_pos, b_pos))
    chans = tl.arange(0, BLOCK_C)
    mask = live[:, None] & (chans < channels)[None, :]
    x_rows = x_ptr + batch * num_tokens * channels + chans[None, :]
    acc = tl.load(x_rows + token[:, None].to(tl.int64) * channels, mask=mask, other=0.0).to(tl.float32)
    start = tl.load(bounds_ptr + batch * (num_b + 1) + j, mask=is_b, other=0)
    count = tl.load(bounds_ptr + batch * (num_b + 1) + j + 1, mask=is_b, other=0) - start
    for k in range(0, tl.max(count, 0)):
        has = k < count
        s = tl.load(src_ptr + batch * num_src + tl.load(order_ptr + batch * num_src + start + k, mask=has, other=0),
                    mask=has, other=0)
        if GRID:
            s_pos = tl.load(a_ptr + s, mask=has, other=0)
        else:
            s_pos = protected + 2 * s
        value = tl.load(x_rows + s_pos[:, None].to(tl.int64) * channels, mask=has[:, None] & mask,
                        other=0.0).to(tl.float32)
        if MEAN:
            acc = tl.where(has[:, None], acc + value, acc)
        else:
            acc = tl.where(has[:, None], tl.maximum(acc, value, propagate_nan=tl.PropagateNan.ALL), acc)
    if MEAN:
        acc = acc / (count + 1).to(tl.float32)[:, None]
    tl.store(out_ptr + (batch * num_out + t[:, None].to(tl.int64)) * channels + chans[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
