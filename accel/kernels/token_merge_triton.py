"""The Triton kernels of ``token_merge.bipartite_merge``: plain functions that ``KernelOp`` wraps
with ``triton.jit``. No ``from __future__ import annotations`` here: Triton reads the
``tl.constexpr`` annotations."""
import triton.language as tl

__all__ = ["merge_targets_kernel", "merge_rows_kernel"]


def merge_targets_kernel(best_ptr, index_ptr, target_ptr, kept_ptr, start_ptr, count_ptr, sources_ptr,
                         num_a, num_b, r, protected, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
                         CHUNK: tl.constexpr):
    """One program per image: each A token's rank by score (descending, ties to the lower index, as
    a stable argsort); the ``r`` best merge into their B token, the rest keep their order. Writes
    ``target [Na]``, the output row each A token goes to, ``kept [Na - r]``, the A token at each
    kept row, and each B token's sources as a segment (``start``, ``count [Nb]``) of ``sources
    [r]``, the merged A tokens sorted by destination, then by index."""
    batch = tl.program_id(0)
    a = tl.arange(0, BLOCK)
    inside = a < num_a
    best = tl.load(best_ptr + batch * num_a + a, mask=inside, other=float("-inf"))
    rank = tl.zeros((BLOCK,), tl.int32)
    for begin in range(0, num_a, CHUNK):  # rank[a] = how many A tokens come before a
        other = begin + tl.arange(0, CHUNK)
        other_best = tl.load(best_ptr + batch * num_a + other, mask=other < num_a, other=float("-inf"))
        before = (other_best[None, :] > best[:, None]) | ((other_best[None, :] == best[:, None]) &
                                                          (other[None, :] < a[:, None]))
        rank += tl.sum((before & (other[None, :] < num_a)).to(tl.int32), axis=1)
    merged = inside & (rank < r)
    keep = inside & ~merged
    kept_rank = tl.cumsum(keep.to(tl.int32), axis=0) - keep.to(tl.int32)
    dst = tl.load(index_ptr + batch * num_a + a, mask=inside, other=0).to(tl.int32)
    first_b = protected + (num_a - r)  # the output row of B token 0
    target = tl.where(merged, first_b + dst, protected + kept_rank)
    tl.store(target_ptr + batch * num_a + a, target, mask=inside)
    tl.store(kept_ptr + batch * (num_a - r) + kept_rank, a, mask=keep)
    # each merged token's place among the sources sorted by (destination, index), and each B
    # token's segment; the other tokens' ranks are recomputed rather than read back from memory
    j = tl.arange(0, BLOCK_B)
    place = tl.zeros((BLOCK,), tl.int32)
    start = tl.zeros((BLOCK_B,), tl.int32)
    count = tl.zeros((BLOCK_B,), tl.int32)
    for begin in range(0, num_a, CHUNK):
        other = begin + tl.arange(0, CHUNK)
        other_in = other < num_a
        other_best = tl.load(best_ptr + batch * num_a + other, mask=other_in, other=float("-inf"))
        ahead_of_other = (best[None, :] > other_best[:, None]) | ((best[None, :] == other_best[:, None]) &
                                                                  (a[None, :] < other[:, None]))
        other_rank = tl.sum((ahead_of_other & inside[None, :]).to(tl.int32), axis=1)
        other_merged = other_in & (other_rank < r)
        other_dst = tl.load(index_ptr + batch * num_a + other, mask=other_in, other=0).to(tl.int32)
        ahead = (other_dst[None, :] < dst[:, None]) | ((other_dst[None, :] == dst[:, None]) & (other[None, :] < a[:, None]))
        place += tl.sum((ahead & other_merged[None, :]).to(tl.int32), axis=1)
        start += tl.sum(((other_dst[None, :] < j[:, None]) & other_merged[None, :]).to(tl.int32), axis=1)
        count += tl.sum(((other_dst[None, :] == j[:, None]) & other_merged[None, :]).to(tl.int32), axis=1)
    tl.store(sources_ptr + batch * r + place, a, mask=merged)
    tl.store(start_ptr + batch * num_b + j, start, mask=j < num_b)
    tl.store(count_ptr + batch * num_b + j, count, mask=j < num_b)


def merge_rows_kernel(x_ptr, size_ptr, kept_ptr, start_ptr, count_ptr, sources_ptr, out_ptr, out_size_ptr,
                      num_tokens, channels, protected, num_a, num_b, r, BLOCK_C: tl.constexpr):
    """One program per (image, output row): a protected or kept A token is copied (as x*s/s, the
    reference's arithmetic); a B token adds its segment of sources, in A order (fp32, no atomics:
    deterministic), and divides by their summed size."""
    batch, t = tl.program_id(0), tl.program_id(1)
    chans = tl.arange(0, BLOCK_C)
    keep = chans < channels
    num_kept = num_a - r
    is_head = t < protected
    is_kept = (t >= protected) & (t < protected + num_kept)
    is_b = ~is_head & ~is_kept
    j = t - protected - num_kept  # the B index of a B row
    a = tl.load(kept_ptr + batch * num_kept + (t - protected), mask=is_kept, other=0)
    token = tl.where(is_head, t, tl.where(is_kept, protected + 2 * a, protected + 2 * j + 1))
    s = tl.load(size_ptr + batch * num_tokens + token).to(tl.float32)
    acc = tl.load(x_ptr + (batch * num_tokens + token) * channels + chans, mask=keep, other=0.0).to(tl.float32) * s
    total = s
    start = tl.load(start_ptr + batch * num_b + j, mask=is_b, other=0)
    count = tl.load(count_ptr + batch * num_b + j, mask=is_b, other=0)
    for k in range(start, start + count):
        source = batch * num_tokens + protected + 2 * tl.load(sources_ptr + batch * r + k)
        s_k = tl.load(size_ptr + source).to(tl.float32)
        acc += tl.load(x_ptr + source * channels + chans, mask=keep, other=0.0).to(tl.float32) * s_k
        total += s_k
    num_out = num_tokens - r
    tl.store(out_ptr + (batch * num_out + t) * channels + chans, (acc / total).to(out_ptr.dtype.element_ty), mask=keep)
    tl.store(out_size_ptr + batch * num_out + t, total.to(out_size_ptr.dtype.element_ty))
