"""accel.kernels.unmerging: unmerge and unmerge2d, the Triton kernel (in Triton's CPU interpreter)
against the torch reference: bit-equal in every dtype (each output row is a copy of one merged row)."""
from __future__ import annotations

import pytest
import torch

import accel.kernels as kernels
from accel.kernels.unmerging import (unmerge, unmerge2d, unmerge2d_reference, unmerge2d_triton, unmerge_reference,
                                     unmerge_triton)
from accel.patches.tome.merge import bipartite_soft_matching
from accel.patches.tome.merge2d import bipartite_soft_matching_random2d

pytestmark = pytest.mark.usefixtures("one_thread")


def merged_case(batch, n, channels, protected, r, seed=0, dtype=torch.float32):
    """A ToMe matching of random tokens and merged tokens ``[B, N - r, C]`` to unmerge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g)
    match = bipartite_soft_matching(x, r, protected)
    merged = torch.randn(batch, n - match.r, channels, generator=g).to(dtype)
    return merged, (protected, match.unm_idx, match.src_idx, match.dst_idx), match


# (batch, N, C, protected, r): one token, two, N not a multiple of the 4-row tile, channels not a power of
# two, a protected prefix of 0/1/5 tokens, r from 0 to its cap (the size of set A), batch 1 and odd
CASES = [(1, 1, 8, 0, 0), (1, 2, 8, 0, 1), (3, 17, 24, 1, 4), (2, 50, 32, 1, 25), (3, 33, 20, 5, 14),
         (1, 12, 3, 5, 0), (1, 6, 5, 5, 0), (5, 64, 48, 0, 32)]


@pytest.mark.parametrize("batch, n, channels, protected, r", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_kernel_is_bit_equal_to_the_reference(batch, n, channels, protected, r, dtype):
    merged, args, match = merged_case(batch, n, channels, protected, r, dtype=dtype)
    out = unmerge_triton(merged, *args)
    ref = unmerge_reference(merged, *args)
    assert out.shape == (batch, n, channels) and out.dtype == dtype
    assert torch.equal(out, ref)
    # and the reference is what BipartiteMatch.unmerge returns on the CPU
    assert torch.equal(match.unmerge(merged), ref)


def test_unmerge_reads_every_merged_row_where_it_belongs():
    """Rows tagged by their merged index: each output must hold the tag the matching says."""
    batch, n, protected, r = 2, 23, 1, 7
    _, args, match = merged_case(batch, n, 4, protected, r, seed=3)
    tags = torch.arange(n - r, dtype=torch.float32)[None, :, None].expand(batch, -1, 4).contiguous()
    out = unmerge_triton(tags, *args)[..., 0]
    for b in range(batch):
        expected = torch.empty(n)
        expected[:protected] = torch.arange(protected)
        n_unm = match.unm_idx.shape[1]
        for k, i in enumerate(match.unm_idx[b].tolist()):
            expected[protected + 2 * i] = protected + k
        for i, j in zip(match.src_idx[b].tolist(), match.dst_idx[b].tolist()):
            expected[protected + 2 * i] = protected + n_unm + j
        for j in range((n - protected) // 2):
            expected[protected + 2 * j + 1] = protected + n_unm + j
        assert torch.equal(out[b], expected)


# (h, w, sx, sy, r, no_rand): partial windows, r capped by the sources, every token a destination,
# one token, random and fixed destinations
GRIDS = [(8, 8, 2, 2, 20, False), (7, 10, 2, 3, 25, False), (6, 9, 3, 2, 100, True), (4, 6, 1, 1, 5, False),
         (1, 1, 1, 1, 0, False), (5, 3, 2, 2, 0, False)]


def grid_case(batch, h, w, sx, sy, r, no_rand, channels=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(h * 100 + w)
    metric = torch.randn(batch, h * w, channels, generator=g)
    match = bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, generator=torch.Generator().manual_seed(1),
                                             no_rand=no_rand)
    x = torch.randn(batch, h * w, channels, generator=g).to(dtype)
    return x, match


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch, dtype", [(3, torch.float32), (1, torch.bfloat16)])
def test_unmerge2d_kernel_is_bit_equal_to_the_reference(grid, batch, dtype):
    x, match = grid_case(batch, *grid, channels=7, dtype=dtype)
    merged = match.merge(x)
    args = (match.a_idx, match.b_idx, match.unm_idx, match.src_idx, match.dst_idx)
    out = unmerge2d_triton(merged, *args)
    assert out.shape == x.shape and torch.equal(out, unmerge2d_reference(merged, *args))
    if match.r == 0:
        assert torch.equal(out, x)  # nothing merged: the tokens back in place, exactly


def test_the_dispatcher_chooses_records_and_refuses_clearly(monkeypatch):
    merged, args, _ = merged_case(1, 9, 8, 1, 2)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    unmerge(merged, *args)
    assert kernels.last_backend("unmerge") == "torch"  # a CPU tensor: the reference
    out = unmerge(merged, *args, backend="triton")  # the interpreter (conftest sets TRITON_INTERPRET=1)
    assert kernels.last_backend("unmerge") == "triton" and torch.equal(out, unmerge_reference(merged, *args))
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    x, match = grid_case(2, 4, 4, 2, 2, 5, False)
    grid_args = (match.a_idx, match.b_idx, match.unm_idx, match.src_idx, match.dst_idx)
    unmerge2d(match.merge(x), *grid_args)
    assert kernels.last_backend("unmerge2d") == "triton"
    with pytest.raises(ValueError, match="unmerge: x must be"):
        unmerge(merged[0], *args)
    with pytest.raises(ValueError, match="unmerge: dst_idx must be int64"):
        unmerge(merged, *args[:3], args[3].int())
    with pytest.raises(ValueError, match="unmerge: protected must be"):
        unmerge(merged, 9, *args[1:])
    with pytest.raises(ValueError, match="unmerge2d: a_idx must be int64 \\[1, \\*\\]"):
        unmerge2d(match.merge(x), match.a_idx.expand(2, -1), *grid_args[1:])
    with pytest.raises(ValueError, match="unmerge2d: x has"):
        unmerge2d(x, *grid_args)


def test_compile_traces_through_the_custom_op():
    merged, args, _ = merged_case(2, 17, 8, 1, 5)

    def fn(x):
        return unmerge(x, *args, backend="triton") * 2

    fn(merged)  # the first call builds the op, outside any graph
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(merged)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert torch.equal(torch.compile(fn, backend="eager")(merged), unmerge_reference(merged, *args) * 2)
    torch._dynamo.reset()
