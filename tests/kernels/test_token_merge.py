"""accel.kernels.bipartite_merge: ToMe's match-and-merge step, its three Triton kernels (in Triton's
CPU interpreter) against the torch reference (the ops ToMe ran before)."""
from __future__ import annotations

import pytest
import torch

import accel.kernels as kernels
import accel.kernels.token_merge as token_merge
from accel.kernels.token_merge import bipartite_merge_reference, bipartite_merge_triton, select_merges

pytestmark = pytest.mark.usefixtures("one_thread")


def case(batch, n, channels, seed=0, dtype=torch.float32, alike=False):
    """Tokens, whole-number sizes (as after earlier merges) and a metric; ``alike`` makes most
    tokens similar, so that several A tokens merge into one B token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g)
    metric = torch.randn(batch, n, 16, generator=g)
    if alike:
        metric = metric * 0.05 + torch.randn(batch, 1, 16, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()
    return x.to(dtype), size.to(dtype), metric.to(dtype)


# (batch, N, C, protected, r): the smallest merge (one A, one B), r at its cap (every A token),
# prefixes of 0, 1 and 5, N not a multiple of anything, odd batches, more A tokens than a rank chunk
CASES = [(1, 2, 8, 0, 1), (1, 3, 8, 1, 1), (3, 17, 24, 1, 4), (2, 50, 32, 1, 25), (2, 33, 20, 5, 14),
         (5, 64, 48, 0, 32), (1, 133, 8, 1, 6)]


@pytest.mark.parametrize("batch, n, channels, protected, r", CASES)
@pytest.mark.parametrize("alike", [False, True])
def test_the_kernels_equal_the_reference_in_fp32(batch, n, channels, protected, r, alike):
    x, size, metric = case(batch, n, channels, alike=alike)
    out, out_size = bipartite_merge_triton(x, size, metric, r, protected)
    ref, ref_size = bipartite_merge_reference(x, size, metric, r, protected)
    assert out.shape == ref.shape == (batch, n - r, channels)
    assert torch.equal(out_size, ref_size)  # whole numbers: exact in any order
    # the same tokens; a B token's sources summed in A order instead of score order
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_the_ranking_is_a_stable_descending_argsort_with_ties():
    g = torch.Generator().manual_seed(1)
    best = torch.randint(0, 4, (3, 70), generator=g).float() / 4  # many exact ties
    best_idx = torch.randint(0, 60, (3, 70), generator=g)
    for r in (1, 17, 70):
        target, kept, start, count, sources = token_merge._TARGETS(best, best_idx, r, 2, 60)
        unm_idx, src_idx, dst_idx = select_merges(best, best_idx, r)
        assert torch.equal(kept.long(), unm_idx)
        expected = torch.empty_like(best_idx)
        expected.scatter_(1, unm_idx, 2 + torch.arange(70 - r).expand(3, -1))
        expected.scatter_(1, src_idx, 2 + (70 - r) + dst_idx)
        assert torch.equal(target.long(), expected)
        # each B token's sources: a segment of the merged tokens sorted by destination, then index
        for image in range(3):
            pairs = sorted(zip(dst_idx[image].tolist(), src_idx[image].tolist()))
            assert sources[image].tolist() == [a for _, a in pairs]
            per_b = torch.bincount(dst_idx[image], minlength=60)
            assert torch.equal(count[image].long(), per_b)
            assert torch.equal(start[image].long(), per_b.cumsum(0) - per_b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sums_in_fp32_and_rounds_once(dtype):
    x, size, metric = case(2, 41, 16, seed=2, dtype=dtype, alike=True)
    out, out_size = bipartite_merge_triton(x, size, metric, 12, 1)
    exact, exact_size = bipartite_merge_reference(x.double(), size.double(), metric.double(), 12, 1)
    assert torch.equal(out_size.double(), exact_size)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    # the fp32 matching may break near-ties of the half-precision metric otherwise than float64:
    # compare where both merged the same tokens (the sizes agree), which is nearly everywhere
    same = (out_size.double() == exact_size)[..., 0]
    assert same.float().mean() > 0.9
    assert ((out.double() - exact).abs() <= ulp * exact.abs() + 1e-6)[same].all()


def test_many_a_tokens_fall_back_to_the_sorted_indices(monkeypatch):
    monkeypatch.setattr(token_merge, "MAX_FUSED_A", 8)
    x, size, metric = case(2, 41, 16, seed=3)
    out, out_size = bipartite_merge_triton(x, size, metric, 10, 1)
    ref, ref_size = bipartite_merge_reference(x, size, metric, 10, 1)
    assert torch.equal(out_size, ref_size)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_the_dispatcher_and_the_old_path(monkeypatch):
    """On the CPU the reference runs, and it is the matching and merge ToMe ran before, bit for bit."""
    from accel.patches.tome.merge import bipartite_soft_matching, merge_weighted

    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    x, size, metric = case(3, 29, 12, seed=4, alike=True)
    out, out_size = kernels.bipartite_merge(x, size, metric, 7, 1)
    assert kernels.last_backend("bipartite_merge") == "torch"
    old, old_size = merge_weighted(bipartite_soft_matching(metric, 7, protected=1), x, size)
    assert torch.equal(out, old) and torch.equal(out_size, old_size)
    kernels.bipartite_merge(x, None, metric, 7, 1, backend="triton")
    assert kernels.last_backend("bipartite_merge") == "triton"
    with pytest.raises(ValueError, match="r must be 1..14"):
        kernels.bipartite_merge(x, size, metric, 15, 1)
    with pytest.raises(ValueError, match="metric"):
        kernels.bipartite_merge(x, size, metric[:, :5], 3, 1)


def test_tome_on_the_kernels_compiles_without_a_graph_break(monkeypatch):
    """ToMe on a ViT with every kernel (match, rank, merge, biased attention) traced by
    torch.compile as custom ops with their fakes: one graph, the eager kernels' output."""
    import accel
    from tests.conftest import images, make_vit

    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    model, pictures = make_vit(), images(2)
    with torch.inference_mode():
        accel.patch(model, tome=4)
        eager = model(pictures)  # the first calls build the ops, outside any graph
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(pictures)
    torch._dynamo.reset()
    assert kernels.last_backend("bipartite_merge") == "triton"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
