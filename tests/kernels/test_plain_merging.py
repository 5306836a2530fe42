"""accel.kernels.merging's plain merges: mean_merge (BipartiteMatch.merge), amax_merge (source tracing)
and mean_merge2d (ToMe-SD's grid), the Triton kernel (in Triton's CPU interpreter) against the torch
reference; the dispatcher's choice; ToMe on a tiny diffusers UNet on the kernels end to end."""
from __future__ import annotations

import pytest
import torch

import accel.kernels as kernels
from accel.kernels.merging import (amax_merge, amax_merge_triton, mean_merge, mean_merge2d, mean_merge2d_triton,
                                   mean_merge_triton, merge2d_reference, merge_reference)
from accel.patches.tome.merge import bipartite_soft_matching, initial_source, merge_source
from accel.patches.tome.merge2d import bipartite_soft_matching_random2d

pytestmark = pytest.mark.usefixtures("one_thread")


def case(batch, n, channels, protected, r, seed=0, crowd=False):
    """Tokens and a real ToMe matching; ``crowd`` makes most tokens alike, so that many A tokens
    match the same B token and segments hold several sources."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g)
    if crowd:
        x[:, protected:] = x[:, protected:] * 0.05 + torch.randn(batch, 1, channels, generator=g)
    match = bipartite_soft_matching(x, r, protected)
    return x, (protected, match.unm_idx, match.src_idx, match.dst_idx)


def most_sources(args, num_b):
    dst = args[3]
    return torch.zeros(dst.shape[0], max(num_b, 1), dtype=torch.long).scatter_add_(
        1, dst, torch.ones_like(dst)).max().item()


# (batch, N, C, protected, r): one token, two, N not a multiple of the 4-row tile, channels not a power of
# two, a protected prefix of 0/1/5 tokens, r from 0 to its cap (the size of set A), batch 1 and odd
CASES = [(1, 1, 8, 0, 0), (1, 2, 8, 0, 1), (3, 17, 24, 1, 4), (2, 50, 32, 1, 25), (3, 33, 20, 5, 14),
         (1, 12, 3, 5, 0), (1, 6, 5, 5, 0), (5, 64, 48, 0, 32)]


@pytest.mark.parametrize("batch, n, channels, protected, r", CASES)
@pytest.mark.parametrize("crowd", [False, True])
def test_mean_and_amax_merge_equal_the_reference_in_fp32(batch, n, channels, protected, r, crowd):
    x, args = case(batch, n, channels, protected, r, crowd=crowd)
    out = mean_merge_triton(x, *args)
    assert out.shape == (batch, n - args[2].shape[1], channels)
    # bit-equal: the reference's fp32 sums in the reference's order (itself, then its sources in
    # matching order, as the CPU scatter-reduce adds them), then one division by the group size
    assert torch.equal(out, merge_reference(x, *args, mode="mean"))
    assert torch.equal(amax_merge_triton(x, *args), merge_reference(x, *args, mode="amax"))  # max is exact


def test_many_sources_into_one_destination():
    x, args = case(2, 41, 16, 1, 20, seed=4, crowd=True)
    assert most_sources(args, 20) >= 3  # the case exercises segments of several sources
    out = mean_merge_triton(x, *args)
    assert torch.equal(out, merge_reference(x, *args, mode="mean"))
    # a constant channel stays constant: each destination divides by its own group's size
    ones = torch.ones(2, 41, 1)
    assert torch.equal(mean_merge_triton(ones, *args), torch.ones(2, 21, 1))


def test_bf16_accumulates_in_fp32_and_rounds_once():
    x, args = case(3, 45, 24, 1, 22, seed=2, crowd=True)
    x = x.to(torch.bfloat16)
    out = mean_merge_triton(x, *args)
    exact = merge_reference(x.double(), *args, mode="mean")  # the bf16 inputs, exactly
    # one conversion: within an ulp of the exact mean (2^-7 relative; the interpreter truncates, a GPU
    # rounds to nearest: half of that)
    assert out.dtype == torch.bfloat16 and ((out.double() - exact).abs() <= 2 ** -7 * exact.abs() + 1e-30).all()
    assert torch.equal(amax_merge_triton(x, *args), merge_reference(x, *args, mode="amax"))


def test_source_tracing_on_the_kernel():
    """Three merges in a row of a 0/1 source matrix: each token's row marks its group, exactly."""
    g = torch.Generator().manual_seed(7)
    metric = torch.randn(3, 21, 8, generator=g)
    ref = fused = initial_source(3, 21, metric.device, metric.dtype)
    for r in (5, 4, 6):
        match = bipartite_soft_matching(metric, r, protected=1)
        args = (match.protected, match.unm_idx, match.src_idx, match.dst_idx)
        ref, fused = merge_source(match, ref), amax_merge(fused, *args, backend="triton")
        metric = match.merge(metric)
        assert torch.equal(fused, ref)
    assert torch.equal(fused.sum(dim=(1, 2)), torch.full((3,), 21.0))  # every input token in one group


GRIDS = [(8, 8, 2, 2, 20, False), (7, 10, 2, 3, 25, False), (6, 9, 3, 2, 100, True), (4, 6, 1, 1, 5, False),
         (1, 1, 1, 1, 0, False), (9, 9, 3, 3, 60, False)]  # (h, w, sx, sy, r, no_rand)


@pytest.mark.parametrize("h, w, sx, sy, r, no_rand", GRIDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_mean_merge2d_equals_the_reference(h, w, sx, sy, r, no_rand, batch):
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(batch, h * w, 7, generator=g)
    match = bipartite_soft_matching_random2d(x, w, h, sx, sy, r, generator=torch.Generator().manual_seed(1),
                                             no_rand=no_rand)
    args = (match.a_idx, match.b_idx, match.unm_idx, match.src_idx, match.dst_idx)
    out = mean_merge2d_triton(x, *args)
    assert out.shape == (batch, h * w - match.r, 7)
    assert torch.equal(out, merge2d_reference(x, *args))  # fp32: the reference's sums and division
    assert torch.equal(match.merge(x), out)  # GridMatch.merge on the CPU: the reference
    bf16 = mean_merge2d_triton(x.bfloat16(), *args)
    exact = merge2d_reference(x.bfloat16().double(), *args)
    assert ((bf16.double() - exact).abs() <= 2 ** -7 * exact.abs() + 1e-30).all()


def test_the_dispatcher_chooses_records_and_refuses_clearly(monkeypatch):
    x, args = case(1, 9, 8, 1, 2)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    for fn in (mean_merge, amax_merge):
        fn(x, *args)
        assert kernels.last_backend(fn.__name__) == "torch"  # a CPU tensor: the reference
        fn(x, *args, backend="triton")  # the interpreter (conftest sets TRITON_INTERPRET=1)
        assert kernels.last_backend(fn.__name__) == "triton"
    with pytest.raises(ValueError, match="mean_merge: x must be \\[B, N, C\\]"):
        mean_merge(x[0], *args)
    with pytest.raises(ValueError, match="amax_merge: x must be floating point"):
        amax_merge(x.long(), *args)
    with pytest.raises(ValueError, match="mean_merge: src_idx and dst_idx must have one shape"):
        mean_merge(x, *args[:3], args[3][:, :1])
    with pytest.raises(ValueError, match="mean_merge: unm_idx and src_idx must split the 5 A tokens"):
        mean_merge(x, 0, *args[1:])
    with pytest.raises(ValueError, match="mean_merge: protected must be"):
        mean_merge(x, -1, *args[1:])
    match = bipartite_soft_matching_random2d(x, 3, 3, 2, 2, 2)
    grid_args = (match.a_idx, match.b_idx, match.unm_idx, match.src_idx, match.dst_idx)
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    mean_merge2d(x, *grid_args)
    assert kernels.last_backend("mean_merge2d") == "triton"
    with pytest.raises(ValueError, match="mean_merge2d: b_idx must be int64"):
        mean_merge2d(x, match.a_idx, match.b_idx.int(), *grid_args[2:])
    with pytest.raises(ValueError, match="mean_merge2d: a_idx and b_idx must split the 8 tokens"):
        mean_merge2d(x[:, :8], *grid_args)


def test_tome_on_a_tiny_unet_on_the_kernels(monkeypatch):
    """ToMe (merging around self-attention, cross-attention and the MLP) with ACCEL_KERNELS=triton:
    matching, grid merges and unmerges all on the kernels, the torch backend's output."""
    import accel
    from tests.patches.test_tome_diffusers import inputs, run, sd_unet

    config = accel.ToMe(ratio=0.5, merge_crossattn=True, merge_mlp=True)
    model = accel.patch(sd_unet(), tome=config)
    args, kw = inputs("sd", batch=2)
    monkeypatch.setenv("ACCEL_KERNELS", "torch")
    reference = run(model, args, kw)
    assert kernels.last_backend("mean_merge2d") == "torch" and kernels.last_backend("unmerge2d") == "torch"
    accel.patch(model, tome=config)  # re-patching re-seeds: the same destinations again
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    fused = run(model, args, kw)
    for op in ("best_match", "mean_merge2d", "unmerge2d"):
        assert kernels.last_backend(op) == "triton", op
    # merges and unmerges are bit-equal in fp32; best_match's scores differ by rounding (2e-6), which
    # may reorder near-equal edges, hence a tolerance rather than equality
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    assert not torch.equal(reference, run(accel.unpatch(model), args, kw))  # ToMe changed the output
