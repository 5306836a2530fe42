"""Attention with an additive per-key bias: softmax(q k^T * scale + bias[b, key]) v.

    out = biased_attention(q, k, v, bias)     # q [B, H, Nq, D], k/v [B, H, Nk, D], bias [B, Nk]

Proportional attention (ToMe, Bolya et al. 2023, Sec. 3) adds log(size) of each key, so a token
standing for s patches counts s times; a key mask for padded ragged batches is the same bias with
-inf at the padding. PyTorch's ``scaled_dot_product_attention`` takes the bias only as a float
mask, which moves it off its flash path onto a slower one; the Triton kernel is a flash-attention
forward that reads the bias as one more vector per key tile (online softmax, no N x N matrix).

The reference is exactly what ToMe's timm adapter ran before: SDPA with ``bias`` cast to q's dtype
as a ``[B, 1, 1, Nk]`` float mask (bit-identical on the CPU).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .dispatch import automatic, interpreting, select
from .registration import KernelOp

__all__ = ["biased_attention", "biased_attention_reference", "biased_attention_triton"]


def biased_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with the bias as a float mask in q's dtype."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[:, None, None, :], dropout_p=dropout_p)


def kernel_wins(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Where the kernel beat SDPA with the float mask on an H100 (fp16, docs/kernels.md): many short
    sequences (ViT-L/16 batch 256: 0.45 against 0.75 ms). It lost on fewer (ViT-B/16 batch 64, 768
    heads of 181 tokens: 0.25 against 0.21 ms, launch-bound) and on long ones with 40-channel heads
    (SD-1.5 latents: 0.62 against 0.30 ms at 4096 tokens), where cuDNN's fused kernels are far ahead."""
    return k.shape[2] <= 512 and q.shape[0] * q.shape[1] >= 2048


def _kernel() -> Any:
    from .attention_triton import biased_attention_kernel

    return biased_attention_kernel


def _blocks(num_q: int, head_dim: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps): 64 x 64 tiles with 4 warps; 128 query rows with 8 warps once
    there are many queries (SD latents)."""
    if num_q >= 1024 and head_dim <= 64:
        return 128, 64, 8
    return 64, 64, 4


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    import triton

    batch, heads, num_q, head_dim = q.shape
    num_k = k.shape[2]
    # [B, Nq, H, D] in memory: merging the heads afterwards (transpose + reshape) is then free
    out = torch.empty(batch, num_q, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    block_m, block_n, warps = _blocks(num_q, head_dim)
    grid = (triton.cdiv(num_q, block_m), batch * heads)
    _OP.jit()[grid](q, k, v, bias, out, heads, num_q, num_k, head_dim,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), bias.stride(0),
                    SCALE=1.0 / math.sqrt(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                    BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                    WIDEN=interpreting() and q.dtype == torch.bfloat16, num_warps=warps)
    return out


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    batch, heads, num_q, head_dim = q.shape
    return q.new_empty(batch, num_q, heads, head_dim).transpose(1, 2)


_OP = KernelOp("biased_attention", _kernel, _launch, _fake)


def biased_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fused kernel: fp32 scores and softmax, output in q's dtype, laid out ``[B, Nq, H, D]`` in
    memory (returned as ``[B, H, Nq, D]``)."""
    return _OP(q, k, v, bias.contiguous())


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *,
                     dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + bias[b, key]) v`` for ``q: [B, H, Nq, D]``, ``k, v: [B, H, Nk, D]``
    and a per-key ``bias: [B, Nk]`` (proportional attention's log size; -inf masks a key). The
    reference is SDPA with the bias as a float mask in q's dtype; attention dropout
    (``dropout_p > 0``) always takes it, and so does the automatic choice where the kernel was
    measured slower (``kernel_wins``)."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"biased_attention: expected q [B, H, Nq, D] and k, v [B, H, Nk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if bias.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"biased_attention: bias must be [B, Nk] = {(k.shape[0], k.shape[2])}; got {tuple(bias.shape)}")
    if dropout_p or (automatic(backend) and not kernel_wins(q, k)):
        backend = "torch"
    chosen = select("biased_attention", q, backend)
    if chosen == "triton":
        return biased_attention_triton(q, k, v, bias)
    return biased_attention_reference(q, k, v, bias, dropout_p)
