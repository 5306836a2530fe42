"""accel.kernels.weighted_merge: the Triton kernel (in Triton's CPU interpreter) against the torch
reference, over prefixes, odd sizes, r from 0 to its cap, and several sources per destination."""
from __future__ import annotations

import pytest
import torch

import accel.kernels as kernels
from accel.kernels.merging import weighted_merge_reference, weighted_merge_triton
from accel.patches.tome.merge import bipartite_soft_matching

pytestmark = pytest.mark.usefixtures("one_thread")


def case(batch, n, channels, protected, r, seed=0, dtype=torch.float32, crowd=False):
    """Tokens, sizes (whole numbers 1-4, as after earlier merges) and a real ToMe matching; ``crowd``
    makes many A tokens match the same B token (most tokens alike), so segments hold several sources."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g)
    if crowd:
        x[:, protected:] = x[:, protected:] * 0.05 + torch.randn(batch, 1, channels, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()
    match = bipartite_soft_matching(x, r, protected)
    return x.to(dtype), size.to(dtype), (protected, match.unm_idx, match.src_idx, match.dst_idx)


CASES = [(1, 1, 8, 0, 0), (1, 2, 8, 0, 1), (3, 17, 24, 1, 4), (2, 50, 32, 1, 25), (2, 33, 20, 5, 14),
         (1, 12, 3, 5, 0), (5, 64, 48, 0, 32)]  # (batch, N, C, protected, r): r up to the size of set A


@pytest.mark.parametrize("batch, n, channels, protected, r", CASES)
@pytest.mark.parametrize("crowd", [False, True])
def test_the_kernel_equals_the_reference_in_fp32(batch, n, channels, protected, r, crowd):
    x, size, match = case(batch, n, channels, protected, r, crowd=crowd)
    out, out_size = weighted_merge_triton(x, size, *match)
    ref, ref_size = weighted_merge_reference(x, size, *match)
    assert out.shape == (batch, n - match[2].shape[1], channels) and out_size.shape == ref_size.shape
    # the same fp32 operations in the same order (each destination's sources in matching order)
    assert torch.equal(out_size, ref_size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_many_sources_into_one_destination(interpret_only=None):
    x, size, match = case(2, 41, 16, 1, 20, seed=4, crowd=True)
    counts = torch.zeros(2, 20, dtype=torch.long).scatter_add_(1, match[3], torch.ones_like(match[3]))
    assert counts.max() >= 3  # the case exercises segments of several sources
    out, out_size = weighted_merge_triton(x, size, *match)
    torch.testing.assert_close(out, weighted_merge_reference(x, size, *match)[0], rtol=0, atol=1e-6)
    assert out_size.sum() == size.sum()  # nothing lost, nothing counted twice


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32(dtype):
    x, size, match = case(2, 33, 32, 1, 12, seed=2, dtype=dtype, crowd=True)
    out, out_size = weighted_merge_triton(x, size, *match)
    exact, exact_size = weighted_merge_reference(x.double(), size.double(), *match)
    assert out.dtype == dtype and torch.equal(out_size.double(), exact_size)  # whole sizes are exact
    # one conversion to the output dtype: within an ulp of the exact mean (bf16 2^-7, fp16 2^-10 relative;
    # Triton's interpreter converts to bf16 by truncation, a GPU rounds to nearest: half of that)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert ((out.double() - exact).abs() <= ulp * exact.abs() + 1e-6).all()


def test_the_dispatcher_and_tome_on_both_kernels(monkeypatch):
    """ToMe on a ViT tracing sources (the path that keeps the matching: best_match, weighted_merge and
    amax_merge) with ACCEL_KERNELS=triton: every op on the kernels, the reference's merges."""
    import accel
    from tests.conftest import images, make_vit

    x, size, match = case(1, 9, 8, 1, 2)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    kernels.weighted_merge(x, None, *match)
    assert kernels.last_backend("weighted_merge") == "torch"
    with pytest.raises(ValueError, match="weighted_merge: expected"):
        kernels.weighted_merge(x[0], size, *match)
    model, pictures = make_vit(), images(3)
    with torch.inference_mode():
        accel.patch(model, tome=accel.ToMe(r=4, trace_source=True))
        monkeypatch.setenv("ACCEL_KERNELS", "torch")
        reference = model(pictures)
        monkeypatch.setenv("ACCEL_KERNELS", "triton")
        fused = model(pictures)
    for op in ("best_match", "weighted_merge", "amax_merge"):
        assert kernels.last_backend(op) == "triton", op
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
