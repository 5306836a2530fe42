"""The Triton kernel of ``grouped_matmul`` (Mixture-of-Experts experts over pairs sorted by expert),
a plain function that ``KernelOp`` wraps with ``triton.jit``. No ``from __future__ import
annotations`` here: Triton reads the ``tl.constexpr`` annotations.

Each program computes a tile of ``BLOCK_M`` pairs x ``BLOCK_N`` output columns for one expert:
the pairs were laid out so that every block of ``BLOCK_M`` belongs to one expert (padded per
expert with a sentinel pair id), so the block's expert is one load. The prologue gathers each
pair's input row (``pair // rows_per_token``: a token's row for the first product, the pair's own
row for the second); the epilogue multiplies by the pair's routing weight and stores the row at
its pair id. Padding blocks (expert -1) and sentinel rows compute nothing and store nothing.
"""
import triton.language as tl

__all__ = ["grouped_matmul_kernel"]


def grouped_matmul_kernel(x_ptr, w_ptr, pairs_ptr, block_experts_ptr, weights_ptr, out_ptr, num_pairs, n_out,
                          k_in, rows_per_token, stride_xm, stride_we, stride_wn, stride_om,
                          HAS_WEIGHTS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[pair] = x[pair // rows_per_token] @ w[expert]^T`` (times ``weights[pair]``) for the pairs
    of block ``program_id(0)``, columns of block ``program_id(1)``; accumulation in float32."""
    expert = tl.load(block_experts_ptr + tl.program_id(0))
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_m).to(tl.int64)
    live = (pair < num_pairs) & (expert >= 0)
    row = tl.where(live, pair // rows_per_token, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert_base = tl.maximum(expert, 0).to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(expert >= 0, k_in, 0)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + row[:, None] * stride_xm + offs_k[None, :], mask=live[:, None] & (offs_k[None, :] < k_in),
                    other=0.0)
        b = tl.load(w_ptr + expert_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=(offs_n[None, :] < n_out) & (offs_k[:, None] < k_in), other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_WEIGHTS:
        acc = acc * tl.load(weights_ptr + pair, mask=live, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pair[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (offs_n[None, :] < n_out))
