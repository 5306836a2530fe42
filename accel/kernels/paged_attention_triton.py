"""The Triton kernel of ``paged_attention.packed_paged_attention``: causal attention of each packed
token over its sequence's pages, flash-decoding style (online softmax, Milakov & Gimelshein 2018;
Dao et al. 2022), a plain function that ``KernelOp`` wraps with ``triton.jit``.

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""
import triton.language as tl

__all__ = ["paged_attention_kernel"]

LOG2E = tl.constexpr(1.4426950408889634)  # a global read inside a kernel must be a constexpr


def paged_attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, seq_ptr, keys_ptr, out_ptr,
                           group, head_dim, block_size, window,
                           stride_qt, stride_qh, stride_qd,
                           stride_kb, stride_ks, stride_kh, stride_kd,
                           stride_vb, stride_vs, stride_vh, stride_vd,
                           stride_ts, stride_tb,
                           stride_ot, stride_oh, stride_od,
                           SCALE: tl.constexpr, SLIDING: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                           WIDEN: tl.constexpr):
    """One program per (token, KV head): the ``group`` query heads that share the KV head (rows of a
    ``BLOCK_G`` tile, padded to 16 for ``tl.dot``) attend to the token's visible keys, positions
    ``[max(0, n - window), n)`` where ``n`` is its position + 1. Keys stream in tiles of ``BLOCK_N``
    positions, each position's slot looked up in the sequence's block table (so a tile may span
    pages and pages may lie anywhere in the pool), with a running maximum, sum and output in base 2
    and fp32. Every tile holds at least one visible key, so no row is ever all -inf. ``WIDEN``:
    take the products in fp32 (Triton's CPU interpreter multiplies bf16 matrices wrongly)."""
    token, kv_head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(seq_ptr + token).to(tl.int64)
    visible = tl.load(keys_ptr + token)                 # keys at positions < visible: causal bound
    first = 0
    if SLIDING:
        first = tl.maximum(visible - window, 0)         # transformers: key > position - window
    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < group) & (dims[None, :] < head_dim)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    qk_scale = SCALE * LOG2E  # a constexpr: torch.compile would pass a float argument as fp64
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    table = table_ptr + seq * stride_ts
    for start in range(first, visible, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        inside = positions < visible
        block = tl.load(table + (positions // block_size) * stride_tb, mask=inside, other=0).to(tl.int64)
        offset = positions % block_size
        kv_mask = inside[:, None] & (dims[None, :] < head_dim)
        k = tl.load(k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
                    + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale       # [BLOCK_G, BLOCK_N]
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        alpha = tl.exp2(running_max - new_max)
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if WIDEN:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
