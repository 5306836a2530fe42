"""accel.kernels.biased_attention: the flash-style Triton kernel (in Triton's CPU interpreter)
against SDPA with the bias as a float mask, and the dispatcher's choices."""
from __future__ import annotations

import math

import pytest
import torch

import accel.kernels as kernels
from accel.kernels.attention import biased_attention_reference, biased_attention_triton

pytestmark = pytest.mark.usefixtures("one_thread")


def data(batch, heads, num_q, num_k, head_dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for n in (num_q, num_k, num_k))
    bias = torch.randint(1, 9, (batch, num_k), generator=g).float().log()  # log sizes, as ToMe's
    return q, k, v, bias


def slow_attention(q, k, v, bias):
    """The definition, in float64: every score written out, softmax over keys."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    return scores.softmax(dim=-1) @ v


# (batch, heads, Nq, Nk, D): one token; Nq and Nk not a multiple of the 64-row tiles; several key
# tiles; head dims below 16, not a power of two (SD's 40) and 64 (ViT's)
SIZES = [(1, 1, 1, 1, 8), (2, 3, 5, 70, 16), (3, 2, 65, 65, 40), (1, 2, 130, 129, 64), (2, 1, 17, 200, 24)]


@pytest.mark.parametrize("size", SIZES)
def test_the_kernel_equals_the_definition_in_fp32(size):
    q, k, v, bias = data(*size)
    out = biased_attention_triton(q, k, v, bias)
    assert out.shape == q.shape and out.dtype == q.dtype
    exact = slow_attention(q, k, v, bias)
    # fp32 products and online softmax, another summation order than SDPA's
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)
    torch.testing.assert_close(biased_attention_reference(q, k, v, bias).double(), exact, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs_accumulate_in_fp32(dtype, atol):
    q, k, v, bias = data(2, 2, 33, 70, 32, seed=1, dtype=dtype)
    out = biased_attention_triton(q, k, v, bias)
    assert out.dtype == dtype
    # the inputs exactly, then one rounding of p to the input dtype before p @ v and of the output
    torch.testing.assert_close(out.double(), slow_attention(q, k, v, bias), rtol=0, atol=atol)


def test_a_minus_infinity_bias_masks_its_key():
    q, k, v, bias = data(2, 2, 9, 20, 16, seed=2)
    bias[0, 5:] = float("-inf")  # image 0: only its first five keys (padding after them)
    out = biased_attention_triton(q, k, v, bias)
    alone = biased_attention_triton(q[:1], k[:1, :, :5], v[:1, :, :5], bias[:1, :5])
    torch.testing.assert_close(out[:1], alone, rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()


def test_strided_inputs_as_timm_makes_them():
    """q, k, v as views of one qkv projection (timm's reshape/permute), not contiguous."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 37, 3, 4, 16, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = torch.rand(2, 37, generator=g)
    out = biased_attention_triton(q, k, v, bias)
    torch.testing.assert_close(out.double(), slow_attention(q, k, v, bias), rtol=0, atol=2e-6)
    # laid out [B, N, H, D]: merging the heads is a free view
    assert out.transpose(1, 2).is_contiguous()


def test_the_dispatcher_chooses_records_and_keeps_autograd(monkeypatch):
    q, k, v, bias = data(1, 2, 6, 6, 8)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    kernels.biased_attention(q, k, v, bias)
    assert kernels.last_backend("biased_attention") == "torch"  # a CPU tensor: the reference
    out = kernels.biased_attention(q, k, v, bias, backend="triton")
    assert kernels.last_backend("biased_attention") == "triton"
    torch.testing.assert_close(out, biased_attention_reference(q, k, v, bias), rtol=0, atol=2e-6)
    # dropout, and gradients, go through the reference whatever was asked
    kernels.biased_attention(q, k, v, bias, dropout_p=0.1, backend="triton")
    assert kernels.last_backend("biased_attention") == "torch"
    q.requires_grad_(True)
    kernels.biased_attention(q, k, v, bias, backend="triton").sum().backward()
    assert kernels.last_backend("biased_attention") == "torch" and q.grad is not None
    with torch.no_grad():
        kernels.biased_attention(q, k, v, bias, backend="triton")
    assert kernels.last_backend("biased_attention") == "triton"


def test_bad_shapes_are_refused_by_name():
    q, k, v, bias = data(1, 2, 6, 6, 8)
    with pytest.raises(ValueError, match="bias must be"):
        kernels.biased_attention(q, k, v, bias[:, :3])
    with pytest.raises(ValueError, match="expected q"):
        kernels.biased_attention(q[0], k, v, bias)


def test_tome_proportional_attention_runs_on_the_kernel(monkeypatch):
    """ToMe on a ViT with ACCEL_KERNELS=triton: the size bias goes through the kernel, and the model's
    logits stay within fp32 rounding of the reference's."""
    import accel
    from tests.conftest import images, make_vit

    model, pictures = make_vit(), images(3)
    with torch.inference_mode():
        accel.patch(model, tome=4)
        monkeypatch.setenv("ACCEL_KERNELS", "torch")
        reference = model(pictures)
        assert kernels.last_backend("biased_attention") == "torch"
        monkeypatch.setenv("ACCEL_KERNELS", "triton")
        fused = model(pictures)
    assert kernels.last_backend("biased_attention") == "triton"
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


def test_the_automatic_choice_keeps_sdpa_where_the_kernel_lost(monkeypatch):
    """On CUDA the kernel runs for many short sequences only (measured on an H100); asking for it
    by name, or by ACCEL_KERNELS, always runs it."""
    from accel.kernels.attention import kernel_wins

    many_short = torch.empty(256, 16, 181, 64, device="meta")
    assert kernel_wins(many_short, many_short)
    assert not kernel_wins(many_short[:64, :12], many_short[:64, :12])  # ViT-B batch 64
    long = torch.empty(2, 8, 4096, 40, device="meta")
    assert not kernel_wins(long, long)  # SD latents
    q, k, v, bias = data(1, 2, 6, 6, 8)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    monkeypatch.setattr("accel.kernels.dispatch._choose", lambda op, tensor, backend: backend or "triton")
    kernels.biased_attention(q, k, v, bias)  # as if on CUDA: a small batch keeps SDPA
    assert kernels.last_backend("biased_attention") == "torch"
    kernels.biased_attention(q, k, v, bias, backend="triton")
    assert kernels.last_backend("biased_attention") == "triton"
