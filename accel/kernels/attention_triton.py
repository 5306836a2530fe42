"""The Triton kernel of ``attention.biased_attention``: a flash-attention forward (Dao et al. 2022)
with an additive per-key bias, a plain function that ``KernelOp`` wraps with ``triton.jit``.

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""
import triton.language as tl

__all__ = ["biased_attention_kernel"]

LOG2E = tl.constexpr(1.4426950408889634)  # a global read inside a kernel must be a constexpr


def biased_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, heads, num_q, num_k, head_dim,
                            stride_qb, stride_qh, stride_qn, stride_qd,
                            stride_kb, stride_kh, stride_kn, stride_kd,
                            stride_vb, stride_vh, stride_vn, stride_vd,
                            stride_ob, stride_oh, stride_on, stride_od, stride_bb,
                            SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """One program per (block of queries, image and head): keys and values stream through in tiles,
    softmax(q k^T * scale + bias) v kept as a running maximum, sum and output (online softmax, in
    base 2 and fp32), so the N x N score matrix never exists. ``WIDEN``: take the products in fp32
    (Triton's CPU interpreter multiplies bf16 matrices wrongly)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=(rows[:, None] < num_q) & (dims[None, :] < head_dim), other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    qk_scale = SCALE * LOG2E  # a constexpr: torch.compile would pass a float argument as fp64
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, num_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < num_k
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=inside[:, None] & (dims[None, :] < head_dim), other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
        bias = tl.load(bias_ptr + b * stride_bb + cols, mask=inside, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :] * LOG2E
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        alpha = tl.exp2(running_max - new_max)
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=inside[:, None] & (dims[None, :] < head_dim), other=0.0)
        if WIDEN:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < num_q) & (dims[None, :] < head_dim))
