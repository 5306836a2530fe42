"""accel.kernels.grouped_matmul: the block-aligned layout of (token, expert) pairs, the Triton kernel
(in Triton's CPU interpreter) against the reference and against a product written per pair, and
the Mixture-of-Experts dispatch on the kernel against the token-by-token loop."""
from __future__ import annotations

import pytest
import torch

from accel.kernels import last_backend
from accel.kernels.grouped_matmul import (align_pairs, grouped_matmul, grouped_matmul_reference,
                                          grouped_matmul_triton)
from accel.llm import moe

pytestmark = pytest.mark.usefixtures("one_thread")


def routing(tokens, experts, top_k, seed=0, dropped=()):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    for t, j in dropped:
        chosen[t, j] = -1
    return chosen


@pytest.mark.parametrize("tokens,experts,top_k,block", [(1, 4, 1, 16), (5, 4, 2, 16), (40, 6, 2, 16), (70, 3, 3, 64)])
def test_the_layout_holds_every_routed_pair_once_in_blocks_of_one_expert(tokens, experts, top_k, block):
    chosen = routing(tokens, experts, top_k, dropped=[(0, 0)])
    pairs, block_experts = align_pairs(chosen, experts, block)
    total = tokens * top_k
    assert pairs.shape[0] == block * block_experts.shape[0]
    assert pairs.shape[0] == -(-(total + experts * (block - 1)) // block) * block  # sized for the worst case
    real = pairs[pairs < total]
    flat = chosen.reshape(-1)
    assert sorted(real.tolist()) == [p for p in range(total) if flat[p] >= 0]  # each routed pair once
    for b, expert in enumerate(block_experts.tolist()):
        ids = pairs[b * block:(b + 1) * block]
        ids = ids[ids < total]
        if expert < 0:
            assert not len(ids)
        else:
            assert (flat[ids] == expert).all()
    used = [e for e in block_experts.tolist() if e >= 0]
    assert block_experts.tolist() == used + [-1] * (len(block_experts) - len(used))  # the runs first, then -1
    assert used == sorted(used)  # in expert order


def per_pair(x, weight, chosen, rows_per_token, weights=None):
    """The product written pair by pair."""
    flat = chosen.reshape(-1)
    out = torch.zeros(flat.shape[0], weight.shape[1], dtype=x.dtype)
    for p, e in enumerate(flat.tolist()):
        if e >= 0:
            out[p] = x[p // rows_per_token] @ weight[e].T * (1.0 if weights is None else weights[p])
    return out


@pytest.mark.parametrize("tokens,experts,top_k,n,k,block", [(3, 4, 2, 24, 40, 16), (33, 5, 2, 70, 33, 16),
                                                            (20, 3, 3, 64, 64, 64)])
@pytest.mark.parametrize("with_weights", [False, True])
def test_the_kernel_equals_the_reference_and_the_product_per_pair(tokens, experts, top_k, n, k, block, with_weights):
    g = torch.Generator().manual_seed(1)
    chosen = routing(tokens, experts, top_k, seed=2, dropped=[(1, 0)])
    total = tokens * top_k
    for rows_per_token, rows in ((top_k, tokens), (1, total)):  # the first product, then the second
        x = torch.randn(rows, k, generator=g)
        weight = torch.randn(experts, n, k, generator=g)
        weights = torch.rand(total, generator=g) if with_weights else None
        pairs, block_experts = align_pairs(chosen, experts, block)
        want = per_pair(x, weight, chosen, rows_per_token, weights)
        ref = grouped_matmul_reference(x, weight, pairs, block_experts, block, total, rows_per_token, weights)
        got = grouped_matmul_triton(x, weight, pairs, block_experts, block, total, rows_per_token, weights)
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not got[1 * top_k].any()  # the dropped pair: zero


def test_half_precision_accumulates_in_float32():
    g = torch.Generator().manual_seed(3)
    chosen = routing(12, 4, 2, seed=4)
    x, weight = torch.randn(12, 48, generator=g).half(), torch.randn(4, 32, 48, generator=g).half()
    pairs, block_experts = align_pairs(chosen, 4, 16)
    got = grouped_matmul_triton(x, weight, pairs, block_experts, 16, 24, 2)
    want = per_pair(x.float(), weight.float(), chosen, 2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("tokens,top_k", [(3, 2), (30, 2), (9, 3)])
def test_the_moe_dispatch_on_the_kernel_equals_the_token_by_token_loop(tokens, top_k):
    g = torch.Generator().manual_seed(5)
    experts, hidden, inner = 5, 32, 24
    gate_up = torch.randn(experts, 2 * inner, hidden, generator=g) / 4
    down = torch.randn(experts, hidden, inner, generator=g) / 4
    x = torch.randn(tokens, hidden, generator=g)
    weights, chosen = moe.softmax_top_k(torch.randn(tokens, experts, generator=g), top_k)
    chosen[0, 0] = -1  # a dropped pair
    got = moe.grouped_experts(x, chosen, weights, gate_up, down, backend="triton")
    assert last_backend("grouped_matmul") == "triton"
    torch.testing.assert_close(got, moe.loop_experts(x, chosen, weights, gate_up, down), rtol=1e-5, atol=1e-5)
    moe.grouped_experts(x, chosen, weights, gate_up, down)
    assert last_backend("grouped_matmul") == "torch"  # the CPU's automatic choice: the sorted loop


def test_bad_arguments_are_refused_by_name():
    x, weight = torch.randn(4, 8), torch.randn(2, 6, 8)
    pairs, block_experts = align_pairs(torch.tensor([[0], [1], [0], [1]]), 2, 16)
    with pytest.raises(ValueError, match="x must be \\[rows, K\\] and weight \\[E, N, K\\] with the same K"):
        grouped_matmul(x, torch.randn(2, 6, 7), pairs, block_experts, 16, 4, 1)
    with pytest.raises(ValueError, match="block must be a power of two >= 16"):
        grouped_matmul(x, weight, pairs, block_experts, 24, 4, 1)
    with pytest.raises(ValueError, match="weights must be \\[num_pairs\\]"):
        grouped_matmul(x, weight, pairs, block_experts, 16, 4, 1, torch.ones(3))
    torch.testing.assert_close(grouped_matmul(x, weight, pairs, block_experts, 16, 4, 1),
                               torch.stack([x[p] @ weight[p % 2].T for p in range(4)]))
