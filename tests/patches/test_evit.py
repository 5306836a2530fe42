"""EViT on timm ViTs: against a slow per-image reference of the paper (explicit CLS attention,
sorting and fusing by hand), the unpatched model, and known token counts."""
import math
from fractions import Fraction

import pytest
import torch

import accel
from accel.api import get_patch
from accel.evit import default_locations, keep_and_fuse
from tests.conftest import build_variant as build, images, make_vit

torch.set_num_threads(1)




VARIANTS = ["vit", "deit_distilled", "deit3_layerscale", "dinov2_registers", "qknorm_postnorm"]


def naive_attention(attn, h):
    """timm Attention on one image ``h: [N, C]`` with an explicit softmax; returns the output
    and the CLS row of the attention averaged over heads ``[N]``."""
    n, heads, dim = h.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(n, 3, heads, dim).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-1, -2)) * dim ** -0.5).softmax(dim=-1)  # [H, N, N]
    out = (probs @ v).transpose(0, 1).reshape(n, heads * dim)
    return attn.proj(attn.norm(out)), probs[:, 0].mean(dim=0)


def reference_logits(model, x, keep_rate, locations, fuse=True):
    """The paper's EViT one image at a time: rank by CLS attention with Python sorting, keep the
    top ceil(rate * n) in their original order, fuse the rest by attention-weighted average."""
    from timm.models.vision_transformer import ResPostBlock

    feats = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    p = model.num_prefix_tokens
    outputs, counts = [], []
    for b in range(x.shape[0]):
        t, count = feats[b], []
        for i, blk in enumerate(model.blocks):
            candidates = t.shape[0] - p
            keep = math.ceil(Fraction(str(keep_rate)) * candidates)
            if i not in locations or keep >= candidates:
                t = blk(t[None])[0]
                count.append(t.shape[0])
                continue
            post = isinstance(blk, ResPostBlock)
            attn_out, cls = naive_attention(blk.attn, t if post else blk.norm1(t))
            t = t + (blk.norm1(attn_out) if post else blk.ls1(attn_out))
            scores = cls[p:].tolist()
            ranked = sorted(range(candidates), key=lambda j: -scores[j])
            kept, rest = sorted(ranked[:keep]), ranked[keep:]
            parts = [t[:p], t[p:][kept]]
            if fuse:
                total = sum(scores[j] for j in rest)
                parts.append((sum(scores[j] * t[p + j] for j in rest) / total)[None])
            t = torch.cat(parts)
            t = t + (blk.norm2(blk.mlp(t)) if post else blk.ls2(blk.mlp(blk.norm2(t))))
            count.append(t.shape[0])
        outputs.append(model.forward_head(model.norm(t)[None])[0])
        counts.append(count)
    assert all(c == counts[0] for c in counts)  # same count for every image: static shapes
    return torch.stack(outputs), counts[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
def test_patched_model_matches_slow_reference(variant, keep_rate):
    model = build(variant)
    x = images(3)
    with torch.inference_mode():
        expected, counts = reference_logits(model, x, keep_rate, [1, 2, 3])
        accel.patch(model, evit=keep_rate)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert get_patch(model, "evit").last_call()["tokens_out"] == counts


def test_locations_fuse_off_and_token_counts():
    model = make_vit()  # 64 patches + CLS
    x = images(2)
    with torch.inference_mode():
        expected, counts = reference_logits(model, x, 0.5, [0, 2], fuse=False)
        accel.patch(model, evit=accel.EViT(keep_rate=0.5, locations=[2, 0], fuse=False))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        assert counts == [33, 33, 17, 17]  # 1 + 32, then 1 + ceil(0.5 * 32)
        accel.patch(model, evit=accel.EViT(keep_rate=0.5, locations=[0, 2]))
        feats = model.forward_features(x)
    # fused: 1 + 32 + 1 = 34 after block 0; then 33 candidates -> ceil(16.5) = 17, + CLS + fused
    assert feats.shape == (2, 19, 48)
    assert accel.describe(model)["methods"]["evit"]["last_call"] == {
        "tokens_in": [65, 34, 34, 19], "tokens_out": [34, 34, 19, 19], "reduced_in": [0, 2]}


def test_default_locations_follow_the_paper_scaled_to_depth():
    assert default_locations(12) == (3, 6, 9)  # 4th, 7th and 10th block (paper, Sec. 4.1)
    assert default_locations(4) == (1, 2, 3)
    assert default_locations(24) == (6, 12, 18)
    assert default_locations(1) == (0,)
    assert accel.EViT(0.7).block_locations(12) == [3, 6, 9]


def test_keep_and_fuse_on_a_hand_computed_example():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
    attn = torch.tensor([[0.5, 0.1, 0.2, 0.05, 0.15]])  # CLS first, never a candidate
    out, kept = keep_and_fuse(x, attn, keep=2, num_prefix=1)
    assert kept.tolist() == [[2, 4]]  # the two highest, in their original order
    fused = (0.1 * torch.tensor([1.0, 0.0]) + 0.05 * torch.tensor([2.0, 2.0])) / 0.15
    torch.testing.assert_close(out, torch.stack([x[0, 0], x[0, 2], x[0, 4], fused])[None])


def test_keep_rate_one_equals_unpatched_and_unpatch_is_bit_exact():
    model = build("deit_distilled")
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    x = images(3)
    with torch.inference_mode():
        ref = model(x)
        accel.patch(model, evit=1.0)
        assert torch.equal(model(x), ref)
        assert get_patch(model, "evit").last_call()["tokens_out"] == [66] * 4
        accel.patch(model, evit=0.5)
        assert not torch.allclose(model(x), ref, atol=1e-4)
        assert list(model.state_dict()) == keys
        accel.unpatch(model)
        assert torch.equal(model(x), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


@pytest.mark.parametrize("batch", [1, 3])
def test_images_of_a_batch_are_reduced_independently(batch):
    model = make_vit()
    x = images(batch, seed=3)
    with torch.inference_mode():
        accel.patch(model, evit=0.6)
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(batch)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_bf16_keep_rate_one_is_exact_and_reduction_runs():
    model = make_vit().to(torch.bfloat16)
    x = images(3).to(torch.bfloat16)
    with torch.inference_mode():
        ref = model(x)
        with accel.patched(model, evit=1.0):
            assert torch.equal(model(x), ref)
        with accel.patched(model, evit=0.5):
            out = model(x)
            assert get_patch(model, "evit").last_call()["tokens_out"] == [65, 34, 19, 11]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_without_inference_mode_gradients_flow():
    model = make_vit()
    accel.patch(model, evit=0.5)
    model(images(2)).sum().backward()
    assert model.blocks[3].mlp.fc1.weight.grad is not None


def test_attention_masks_are_refused_when_reducing():
    model = make_vit()
    accel.patch(model, evit=0.5)
    with torch.inference_mode(), pytest.raises(ValueError, match="attn_mask/is_causal cannot be combined"):
        model(images(1), is_causal=True)


@pytest.mark.parametrize("value, error, match", [
    (1.5, ValueError, "keep_rate must be in"),
    (0.0, ValueError, "keep_rate must be in"),
    (float("nan"), ValueError, "keep_rate must be in"),
    (True, TypeError, "not a bool"),
    ("0.7", TypeError, "float keep rate"),
    (dict(keep_rate=0.7, locations=[1, 1]), ValueError, "distinct"),
    (dict(keep_rate=0.7, locations=[0.5]), TypeError, "locations"),
    (dict(keep_rate=0.7, locations=[4]), ValueError, "out of range"),
    (dict(keep_rate=0.7, fuse=1), TypeError, "fuse"),
])
def test_bad_settings_get_clear_errors(value, error, match):
    model = make_vit()
    with pytest.raises(error, match=match):
        accel.patch(model, evit=value)
    assert get_patch(model, "evit") is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_token=False, global_pool="avg"), "no class token"),
    (dict(global_pool="avg"), "global_pool='avg'"),
])
def test_models_without_cls_or_token_pooling_get_type_error_and_stay_untouched(kwargs, match):
    model = make_vit(**kwargs)
    x = images(2)
    with torch.inference_mode():
        ref = model(x)
        with pytest.raises(TypeError, match=match):
            accel.patch(model, evit=0.7)
        assert torch.equal(model(x), ref)
    assert not hasattr(model, "_accel_patches")
    assert all("_accel_hooks" not in vars(m) for m in model.modules())


def test_torch_compile_matches_eager():
    model = make_vit()
    x = images(3)
    with torch.inference_mode():
        accel.patch(model, evit=0.5)
        eager = model(x)
        compiled = torch.compile(model)(x)  # static shapes: no dynamic=True needed
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
