"""The Triton kernel of ``matching.best_match``, as a plain function that ``matching._kernel`` wraps
with ``triton.jit`` (so that the interpreter setting in force at that moment applies).

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""
import triton.language as tl

__all__ = ["best_match_kernel"]


def best_match_kernel(a_ptr, b_ptr, best_ptr, index_ptr, num_a, num_b, channels,
                      stride_ab, stride_an, stride_ac, stride_bb, stride_bn, stride_bc,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                      USE_DOT: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr, TIE: tl.constexpr):
    """One program per (image, tile of a-rows); b streams through in tiles, each tile's scores
    reduced into a running maximum and argmax.

    ``USE_DOT=False`` (up to 64 channels, ViT metrics): rows normalised, then a product-sum, so every
    score is the same sum of the same products wherever its b-row sits in the tile. ``USE_DOT=True``
    (wide SD features): ``tl.dot`` over channel chunks on the tensor cores, divided by the two row
    norms afterwards. A matrix unit (or the interpreter's BLAS) may round the same dot product
    differently at another position in the tile, so there scores within ``TIE`` of the best count
    as tied. Either way identical b-rows (blank patches) go to the lower index, as in the
    reference. ``WIDEN``: products in fp32 (Triton's CPU interpreter multiplies
    bf16 matrices wrongly)."""
    batch, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_A + tl.arange(0, BLOCK_A)
    chans = tl.arange(0, BLOCK_C)
    a_base = a_ptr + batch * stride_ab + rows[:, None] * stride_an
    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_A,), tl.int32)
    if USE_DOT:
        a_sq = tl.zeros((BLOCK_A,), tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            a = tl.load(a_base + (c0 + chans)[None, :] * stride_ac,
                        mask=(rows[:, None] < num_a) & ((c0 + chans)[None, :] < channels), other=0.0).to(tl.float32)
            a_sq += tl.sum(a * a, axis=1)
        a_norm = tl.maximum(tl.sqrt(a_sq), 1e-6)
    else:
        a = tl.load(a_base + chans[None, :] * stride_ac, mask=(rows[:, None] < num_a) & (chans[None, :] < channels),
                    other=0.0).to(tl.float32)
        a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-6)[:, None]
    for start in range(0, num_b, BLOCK_B):
        cols = start + tl.arange(0, BLOCK_B)
        b_base = b_ptr + batch * stride_bb + cols[:, None] * stride_bn
        if USE_DOT:
            raw = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
            b_sq = tl.zeros((BLOCK_B,), tl.float32)
            for c0 in range(0, channels, BLOCK_C):
                inside = (c0 + chans)[None, :] < channels
                a_chunk = tl.load(a_base + (c0 + chans)[None, :] * stride_ac, mask=(rows[:, None] < num_a) & inside,
                                  other=0.0)
                b_chunk = tl.load(b_base + (c0 + chans)[None, :] * stride_bc, mask=(cols[:, None] < num_b) & inside,
                                  other=0.0)
                if WIDEN:
                    a_chunk, b_chunk = a_chunk.to(tl.float32), b_chunk.to(tl.float32)
                raw += tl.dot(a_chunk, tl.trans(b_chunk), input_precision=PRECISION)
                b_wide = b_chunk.to(tl.float32)
                b_sq += tl.sum(b_wide * b_wide, axis=1)
            scores = raw / a_norm[:, None] / tl.maximum(tl.sqrt(b_sq), 1e-6)[None, :]
        else:
            b = tl.load(b_base + chans[None, :] * stride_bc, mask=(cols[:, None] < num_b) & (chans[None, :] < channels),
                        other=0.0).to(tl.float32)
            b = b / tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), 1e-6)[:, None]
            scores = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        scores = tl.where(cols[None, :] < num_b, scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        # the lowest index reaching the tile's maximum (within TIE); a later tile wins only when
        # better by more than TIE
        tile_index = tl.min(tl.where(scores >= tile_best[:, None] - TIE, cols[None, :], num_b), axis=1)
        better = tile_best > best + TIE
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
    tl.store(best_ptr + batch * num_a + rows, best, mask=rows < num_a)
    tl.store(index_ptr + batch * num_a + rows, best_index.to(tl.int64), mask=rows < num_a)
