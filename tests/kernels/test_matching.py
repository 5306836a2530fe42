"""accel.kernels.best_match: the Triton kernel (in Triton's CPU interpreter) against the torch reference,
and the dispatcher's choice of backend."""
from __future__ import annotations

import pytest
import torch

import accel.kernels as kernels
import accel.kernels.dispatch as dispatch
from accel.kernels.matching import best_match_reference, best_match_triton

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels on the CPU, through Triton's interpreter (how CI runs them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def data(batch, num_a, num_b, channels, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num_a, channels, generator=g).to(dtype),
            torch.randn(batch, num_b, channels, generator=g).to(dtype))


def clear_winners(a, b, gap):
    """Rows whose best b-row beats the second best by more than ``gap`` (in float64): there the two
    backends must pick the same index whatever their rounding."""
    scores = best_match_reference(a.double(), b.double())[0]
    full = kernels.unit_rows(a.double()) @ kernels.unit_rows(b.double()).transpose(-1, -2)
    top2 = full.topk(min(2, full.shape[-1]), dim=-1).values
    return (top2[..., 0] - top2[..., -1] > gap) | (full.shape[-1] == 1), scores


# (batch, Na, Nb, C): one token, N not a multiple of a tile (16 a-rows, 32 b-rows), several b tiles,
# channels below and above a power of two, odd batches; above 64 channels the tensor-core path
# (64 x 64 tiles, channels in chunks of 64: one partial chunk, several)
SIZES = [(1, 1, 1, 8), (1, 1, 5, 3), (3, 17, 16, 24), (2, 37, 70, 64), (5, 16, 33, 20), (1, 98, 98, 64),
         (1, 1, 3, 80), (2, 70, 130, 72), (1, 65, 40, 200)]


@pytest.mark.parametrize("size", SIZES)
def test_the_kernel_equals_the_reference_in_fp32(interpret, size):
    a, b = data(*size)
    best, index = best_match_triton(a, b)
    ref_best, ref_index = best_match_reference(a, b)
    assert best.dtype == torch.float32 and index.dtype == torch.int64 and best.shape == size[:2]
    torch.testing.assert_close(best, ref_best, rtol=0, atol=2e-6)  # fp32 dot products, other summation order
    clear, _ = clear_winners(a, b, 1e-5)
    assert torch.equal(index[clear], ref_index[clear]) and clear.float().mean() > 0.9


@pytest.mark.parametrize("size", [(2, 19, 40, 32), (1, 64, 64, 48), (1, 40, 70, 96)])
def test_the_kernel_in_bf16_accumulates_in_fp32(interpret, size):
    a, b = data(*size, dtype=torch.bfloat16)
    best, index = best_match_triton(a, b)
    exact, exact_index = best_match_reference(a.double(), b.double())  # the bf16 inputs, exactly
    torch.testing.assert_close(best.double(), exact, rtol=0, atol=1e-5)  # fp32 accumulation of bf16 products
    clear, _ = clear_winners(a, b, 1e-4)
    assert torch.equal(index[clear], exact_index[clear])


@pytest.mark.parametrize("channels", [16, 80])  # the product-sum and the tensor-core path
def test_ties_go_to_the_lower_index_within_and_across_tiles(interpret, channels):
    a, b = data(1, 5, 150, channels, seed=3)
    b[0, 140] = b[0, 40] = b[0, 3]  # the same row in the first and the third tile of 16 (of 64: the third)
    b[0, 41] = b[0, 40] * 2  # and a scaled copy: the same cosine similarity
    a[0, 0] = b[0, 3] * 0.5  # a-row 0 matches rows 3, 40 and 41 equally well
    b[0, 10] = b[0, 9]
    a[0, 1] = b[0, 9]  # a-row 1 matches rows 9 and 10 equally well, in one tile
    for backend in ("torch", "triton"):
        _, index = kernels.best_match(a, b, backend=backend)
        assert index[0, :2].tolist() == [3, 9], backend


def test_the_dispatcher_chooses_records_and_refuses_clearly(monkeypatch):
    a, b = data(1, 4, 6, 8)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels.best_match(a, b)
    assert kernels.last_backend("best_match") == "torch"  # a CPU tensor: the reference
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.best_match(a, b, backend="triton")
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    with pytest.raises(ValueError, match="CUDA tensors"):
        kernels.best_match(a, b)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reference = best_match_reference(a, b)
    best, index = kernels.best_match(a, b)  # the environment asks for Triton, the interpreter runs it
    assert kernels.last_backend("best_match") == "triton" and torch.equal(index, reference[1])
    kernels.best_match(a, b, backend="torch")  # a call's backend wins over the environment
    assert kernels.last_backend("best_match") == "torch"
    monkeypatch.setenv("ACCEL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ACCEL_KERNELS must be one of torch, triton; got 'cuda'"):
        kernels.best_match(a, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.best_match(a, b, backend="fast")
    with pytest.raises(ValueError, match="b has no rows"):
        kernels.best_match(a, b[:, :0], backend="torch")


def test_without_triton_the_automatic_choice_is_the_reference(monkeypatch):
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    a, b = data(1, 4, 6, 8)
    assert dispatch.select("best_match", a.to("meta")) == "torch"
    kernels.best_match(a, b)
    assert kernels.last_backend("best_match") == "torch"
    with pytest.raises(ValueError, match="Triton is not installed"):
        kernels.best_match(a, b, backend="triton")


def test_compile_traces_through_the_custom_op(interpret):
    a, b = data(2, 20, 24, 16)

    def fn(a, b):
        best, index = kernels.best_match(a, b, backend="triton")
        return best * 2, index

    fn(a, b)  # the first call builds the op, outside any graph
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(a, b)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    out = torch.compile(fn, backend="eager")(a, b)
    assert torch.equal(out[1], best_match_triton(a, b)[1])
    torch._dynamo.reset()
