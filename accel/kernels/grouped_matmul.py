"""The products of Mixture-of-Experts experts over (token, expert) pairs sorted by expert (issue 17).

    pairs, block_experts = align_pairs(experts, num_experts, block)      # experts [T, k] -> the layout
    out = grouped_matmul(x, weight, pairs, block_experts, block, num_pairs, rows_per_token, weights)

The layout (after vLLM's ``fused_moe``, reimplemented): the pair ids ``t * k + j`` sorted by expert,
each expert's run padded to a multiple of ``block`` with the sentinel ``num_pairs``, and one expert
id per block (-1 for blocks past the last expert's run). Every block then belongs to one expert,
so a kernel program multiplies a block of pairs by one expert's weight. The layout is sized for
the worst case (``T * k + E * (block - 1)`` slots, rounded up to a block), so building it reads
nothing back to the host.

``grouped_matmul``: ``out[p] = x[p // rows_per_token] @ weight[e]^T`` (times ``weights[p]``) for
every pair ``p`` routed to expert ``e``, ``out [T * k, N]`` in pair order; pairs not routed (dropped,
or another rank's experts) are left zero. ``weight [E, N, K]`` is transformers' layout
(``gate_up_proj [E, 2I, H]`` with ``rows_per_token = k``, then ``down_proj [E, H, I]`` with
``rows_per_token = 1`` and the routing weights). The reference is a plain loop over the blocks; the
Triton kernel gathers each pair's row in its prologue and applies its routing weight in its
epilogue, accumulating in float32 (float32 inputs at IEEE precision, not TF32).

On the CPU ``accel.llm.moe`` runs its own sorted loop (faster there than either); on CUDA its
dispatch goes through this op.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .dispatch import select
from .registration import KernelOp

__all__ = ["align_pairs", "grouped_matmul", "grouped_matmul_reference", "grouped_matmul_triton"]

BLOCK_N = 64
BLOCK_K = 32


def align_pairs(experts: torch.Tensor, num_experts: int, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``experts [T, k]`` (ids outside ``[0, E)`` not routed) -> (``pairs`` int64, the pair ids sorted by
    expert, each expert's run padded to a multiple of ``block`` with ``T * k``; ``block_experts``
    int64, each block's expert, -1 past the last run). Sized for the worst case: no host sync."""
    flat = experts.reshape(-1)
    total = flat.shape[0]
    routed = (flat >= 0) & (flat < num_experts)
    key = torch.where(routed, flat, num_experts)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block - 1) // block * block
    padded_ends = padded.cumsum(0)
    padded_starts = padded_ends - padded
    starts = counts.cumsum(0) - counts
    order = torch.argsort(key, stable=True)
    ranked = key[order]
    slots = -(-(total + num_experts * (block - 1)) // block) * block
    pairs = torch.full((slots,), total, dtype=torch.int64, device=flat.device)
    keep = ranked < num_experts
    expert_of = ranked.clamp_max(num_experts - 1)
    rank = torch.arange(total, device=flat.device) - starts[expert_of]
    dest = torch.where(keep, padded_starts[expert_of] + rank, slots)  # the unrouted land past the end
    pairs = torch.cat([pairs, pairs.new_empty(1)]).index_put_((dest,), order)[:slots]
    block_starts = torch.arange(0, slots, block, device=flat.device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True)
    return pairs, torch.where(block_experts < num_experts, block_experts, -1)


def grouped_matmul_reference(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, block_experts: torch.Tensor,
                             block: int, num_pairs: int, rows_per_token: int,
                             weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch, block by block: each block's routed pairs times its expert's weight."""
    out = x.new_zeros(num_pairs, weight.shape[1])
    for b, expert in enumerate(block_experts.tolist()):
        ids = pairs[b * block:(b + 1) * block]
        ids = ids[ids < num_pairs]
        if expert < 0 or not len(ids):
            continue
        rows = x[ids // rows_per_token].float() @ weight[expert].float().T
        if weights is not None:
            rows = rows * weights[ids].float()[:, None]
        out[ids] = rows.to(out.dtype)
    return out


def _kernel() -> Any:
    from .grouped_matmul_triton import grouped_matmul_kernel

    return grouped_matmul_kernel


def _launch(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, block_experts: torch.Tensor, block: int,
            num_pairs: int, rows_per_token: int, weights: Optional[torch.Tensor]) -> torch.Tensor:
    import triton

    out = x.new_zeros(num_pairs, weight.shape[1])
    if out.numel() == 0 or block_experts.numel() == 0:
        return out
    x, weight = x.contiguous(), weight.contiguous()
    grid = (block_experts.shape[0], triton.cdiv(weight.shape[1], BLOCK_N))
    _OP.jit()[grid](x, weight, pairs, block_experts, weights if weights is not None else x, out, num_pairs,
                    weight.shape[1], weight.shape[2], rows_per_token, x.stride(0), weight.stride(0), weight.stride(1),
                    out.stride(0), HAS_WEIGHTS=weights is not None, IEEE=x.dtype == torch.float32, BLOCK_M=block,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def _fake(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, block_experts: torch.Tensor, block: int,
          num_pairs: int, rows_per_token: int, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(num_pairs, weight.shape[1])


_OP = KernelOp("grouped_matmul", _kernel, _launch, _fake)


def grouped_matmul_triton(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, block_experts: torch.Tensor,
                          block: int, num_pairs: int, rows_per_token: int,
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel: one launch over every block and column tile."""
    return _OP(x, weight, pairs, block_experts, block, num_pairs, rows_per_token, weights)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, block_experts: torch.Tensor,
                   block: int, num_pairs: int, rows_per_token: int, weights: Optional[torch.Tensor] = None, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``out [num_pairs, N]``: for every routed pair ``p`` of expert ``e`` in the layout of
    ``align_pairs`` (``block`` a power of two, at least 16), ``x[p // rows_per_token] @ weight[e]^T``,
    times ``weights[p]`` when given; unrouted pairs zero."""
    if x.ndim != 2 or weight.ndim != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_matmul: x must be [rows, K] and weight [E, N, K] with the same K; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"grouped_matmul: block must be a power of two >= 16; got {block}")
    if pairs.dtype != torch.int64 or block_experts.dtype != torch.int64 or pairs.shape[0] != block * block_experts.shape[0]:
        raise ValueError("grouped_matmul: pairs and block_experts must be int64, block * len(block_experts) pairs "
                         "(align_pairs' layout)")
    if weights is not None and weights.shape != (num_pairs,):
        raise ValueError(f"grouped_matmul: weights must be [num_pairs] = [{num_pairs}]; got {tuple(weights.shape)}")
    if select("grouped_matmul", x, backend) == "triton":
        return grouped_matmul_triton(x, weight, pairs, block_experts, block, num_pairs, rows_per_token, weights)
    return grouped_matmul_reference(x, weight, pairs, block_experts, block, num_pairs, rows_per_token, weights)
