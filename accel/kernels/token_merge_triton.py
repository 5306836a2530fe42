"""The Triton kernels of ``token_merge.bipartite_merge``: plain functions that ``KernelOp`` wraps
with ``triton.jit``. No ``from __future__ import annotations`` here: Triton reads the
``tl.constexpr`` annotations."""
import triton.language as tl

__all__ = ["merge_targets_kernel", "merge_rows_kernel"]


def merge_targets_kernel(best_ptr, index_ptr, target_ptr, kept_ptr, num_a, r, protected,
                         BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """One program per image: each A token's rank by score (descending, ties to the lower index, as
    a stable argsort); the ``r`` best merge into their B token, the rest keep their order. Writes
    ``target [Na]``, the output row each A token goes to, and ``kept [Na - r]``, the A token at each
    kept row."""
    batch = tl.program_id(0)
    a = tl.arange(0, BLOCK)
    inside = a < num_a
    best = tl.load(best_ptr + batch * num_a + a, mask=inside, other=float("-inf"))
    rank = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, num_a, CHUNK):  # rank[a] = how many A tokens come before a
        other = start + tl.arange(0, CHUNK)
        other_best = tl.load(best_ptr + batch * num_a + other, mask=other < num_a, other=float("-inf"))
        before = (other_best[None, :] > best[:, None]) | ((other_best[None, :] == best[:, None]) &
                                                          (other[None, :] < a[:, None]))
        rank += tl.sum((before & (other[None, :] < num_a)).to(tl.int32), axis=1)
    merged = rank < r
    keep = inside & ~merged
    kept_rank = tl.cumsum(keep.to(tl.int32), axis=0) - keep.to(tl.int32)
    dst = tl.load(index_ptr + batch * num_a + a, mask=inside, other=0).to(tl.int32)
    target = tl.where(merged, protected + (num_a - r) + dst, protected + kept_rank)
    tl.store(target_ptr + batch * num_a + a, target, mask=inside)
    tl.store(kept_ptr + batch * (num_a - r) + kept_rank, a, mask=keep)


def merge_rows_kernel(x_ptr, size_ptr, target_ptr, kept_ptr, out_ptr, out_size_ptr, num_tokens, channels,
                      protected, num_a, r, BLOCK_C: tl.constexpr):
    """One program per (image, output row): a protected or kept A token is copied (as x*s/s, the
    reference's arithmetic); a B token adds the A tokens whose target it is, in A order (fp32, no
    atomics: deterministic), and divides by their summed size."""
    batch, t = tl.program_id(0), tl.program_id(1)
    chans = tl.arange(0, BLOCK_C)
    keep = chans < channels
    num_kept = num_a - r
    is_head = t < protected
    is_kept = (t >= protected) & (t < protected + num_kept)
    j = t - protected - num_kept  # the B index of a B row
    a = tl.load(kept_ptr + batch * num_kept + (t - protected), mask=is_kept, other=0)
    token = tl.where(is_head, t, tl.where(is_kept, protected + 2 * a, protected + 2 * j + 1))
    s = tl.load(size_ptr + batch * num_tokens + token).to(tl.float32)
    acc = tl.load(x_ptr + (batch * num_tokens + token) * channels + chans, mask=keep, other=0.0).to(tl.float32) * s
    total = s
    sources = tl.where(is_head | is_kept, 0, num_a)
    for i in range(0, sources):
        hit = tl.load(target_ptr + batch * num_a + i) == t
        source = batch * num_tokens + protected + 2 * i
        s_i = tl.load(size_ptr + source, mask=hit, other=0.0).to(tl.float32)
        acc += tl.load(x_ptr + source * channels + chans, mask=keep & hit, other=0.0).to(tl.float32) * s_i
        total += s_i
    num_out = num_tokens - r
    tl.store(out_ptr + (batch * num_out + t) * channels + chans, (acc / total).to(out_ptr.dtype.element_ty), mask=keep)
    tl.store(out_size_ptr + batch * num_out + t, total.to(out_size_ptr.dtype.element_ty))
