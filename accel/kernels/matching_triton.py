"""The Triton kernel of ``matching.best_match``, as a plain function that ``matching._kernel`` wraps
with ``triton.jit`` (so that the interpreter setting in force at that moment applies).

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""
import triton.language as tl

__all__ = ["best_match_kernel"]


def best_match_kernel(a_ptr, b_ptr, best_ptr, index_ptr, num_a, num_b, channels,
                      stride_ab, stride_an, stride_ac, stride_bb, stride_bn, stride_bc,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    batch, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_A + tl.arange(0, BLOCK_A)
    chans = tl.arange(0, BLOCK_C)
    a = tl.load(a_ptr + batch * stride_ab + rows[:, None] * stride_an + chans[None, :] * stride_ac,
                mask=(rows[:, None] < num_a) & (chans[None, :] < channels), other=0.0).to(tl.float32)
    a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-6)[:, None]
    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_A,), tl.int32)
    for start in range(0, num_b, BLOCK_B):
        cols = start + tl.arange(0, BLOCK_B)
        b = tl.load(b_ptr + batch * stride_bb + cols[:, None] * stride_bn + chans[None, :] * stride_bc,
                    mask=(cols[:, None] < num_b) & (chans[None, :] < channels), other=0.0).to(tl.float32)
        b = b / tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), 1e-6)[:, None]
        # A product-sum rather than tl.dot: every score is then the same sum of the same products
        # wherever its b-row sits in the tile, so identical b-rows (blank patches) tie exactly and
        # go to the lower index, as in the reference; a tiled GEMM rounds by position.
        scores = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        scores = tl.where(cols[None, :] < num_b, scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        # the lowest index reaching the tile's maximum; a later tile wins only when strictly better
        tile_index = tl.min(tl.where(scores == tile_best[:, None], cols[None, :], num_b), axis=1)
        better = tile_best > best
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
    tl.store(best_ptr + batch * num_a + rows, best, mask=rows < num_a)
    tl.store(index_ptr + batch * num_a + rows, best_index.to(tl.int64), mask=rows < num_a)

