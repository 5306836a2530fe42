"""The Triton kernel of ``merging.weighted_merge``, a plain function that ``KernelOp`` wraps with
``triton.jit``. No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr``
annotations."""
import triton.language as tl

__all__ = ["weighted_merge_kernel"]


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
