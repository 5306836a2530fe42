"""ToMe on timm ViTs: against a slow per-image reference of the paper, the unpatched model, and
known token counts."""
import pytest
import torch

import accel
from accel.api import get_patch
from tests.conftest import SMALL, build_variant as build, images, make_vit
from tests.patches.test_tome_merge import reference_merge


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer




VARIANTS = ["vit", "deit_distilled", "deit3_layerscale", "registers_avgpool", "dinov2_registers",
            "qknorm_postnorm", "dynamic_img_size"]


def naive_attention(attn, h, size):
    """timm Attention on one image [N, C] with explicit softmax; returns output and mean keys."""
    n = h.shape[0]
    heads, dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(n, 3, heads, dim).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * dim ** -0.5
    if size is not None:
        logits = logits + size.log()[None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, heads * dim)
    return attn.proj(attn.norm(out)), k.mean(dim=0)


def reference_logits(model, x, schedule, prop_attn=True):
    """The paper's ToMe on a timm ViT, one image at a time, with lists for the matching."""
    from timm.models.vision_transformer import ResPostBlock

    feats = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    p = model.num_prefix_tokens
    outputs = []
    for b in range(x.shape[0]):
        t, size = feats[b], torch.ones(feats.shape[1])
        for blk, r in zip(model.blocks, schedule):
            post = isinstance(blk, ResPostBlock)
            attn_out, keys = naive_attention(blk.attn, t if post else blk.norm1(t), size if prop_attn else None)
            t = t + (blk.norm1(attn_out) if post else blk.ls1(attn_out))
            r = min(r, (t.shape[0] - p) // 2)
            if r > 0:
                t, size, _ = reference_merge(t, keys, size, r, p)
                t, size = t.float(), size.float()
            t = t + (blk.norm2(blk.mlp(t)) if post else blk.ls2(blk.mlp(blk.norm2(t))))
        t = model.norm(t)
        if hasattr(model, "head_dist"):
            outputs.append((model.head(t[0]) + model.head_dist(t[1])) / 2)
            continue
        if model.global_pool == "token":
            pooled = t[0]
        else:
            weights = size[p:, None]
            pooled = (t[p:] * weights).sum(0) / weights.sum()
        outputs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outputs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_model_matches_slow_reference(variant):
    model = build(variant)
    x = images(3, size=(32, 48) if variant == "dynamic_img_size" else (32, 32))
    with torch.inference_mode():
        expected = reference_logits(model, x, [6, 6, 6, 6])
        accel.patch(model, tome=6)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert get_patch(model, "tome").last_call()["merged"] == [6, 6, 6, 6]


@pytest.mark.parametrize("variant", VARIANTS)
def test_r0_equals_unpatched_and_unpatch_is_bit_exact(variant):
    model = build(variant)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    x = images(2)
    with torch.inference_mode():
        ref = model(x)
        accel.patch(model, tome=0)
        assert torch.equal(model(x), ref)
        accel.patch(model, tome=5)
        assert not torch.equal(model(x), ref)
        accel.unpatch(model)
        assert torch.equal(model(x), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def test_prop_attn_off_matches_reference_without_size_bias():
    model = make_vit()
    x = images(2)
    with torch.inference_mode():
        expected = reference_logits(model, x, [8, 8, 8, 8], prop_attn=False)
        accel.patch(model, tome=accel.ToMe(r=8, prop_attn=False))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_schedules_per_block_list_and_decreasing():
    model = make_vit()
    x = images(1)
    with torch.inference_mode():
        expected = reference_logits(model, x, [10, 0, 3, 7])
        accel.patch(model, tome=[10, 0, 3, 7])
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        assert accel.describe(model)["methods"]["tome"]["last_call"]["merged"] == [10, 0, 3, 7]
        accel.patch(model, tome=accel.ToMe(r=4, inflect=0.5))
        model(x)
    assert accel.ToMe(r=4, inflect=0.5).per_block_r(4) == [6, 5, 3, 2]  # mean stays 4, decreasing
    assert accel.ToMe(r=(4, -0.5)).per_block_r(4) == [2, 3, 5, 6]
    assert get_patch(model, "tome").last_call()["merged"] == [6, 5, 3, 2]


def test_r_is_capped_by_available_tokens_and_describe_reports_counts():
    model = make_vit()  # 64 patches + CLS
    x = images(2)
    with torch.inference_mode():
        accel.patch(model, tome=20)
        feats = model.forward_features(x)
    last = accel.describe(model)["methods"]["tome"]["last_call"]
    # cap: half of the non-prefix tokens, (65-1)//2 = 32, (45-1)//2 = 22, (25-1)//2 = 12, (13-1)//2 = 6
    assert last == {"tokens_in": [65, 45, 25, 13], "merged": [20, 20, 12, 6], "tokens_out": 7}
    assert feats.shape == (2, 7, 48)  # forward_features returns the merged tokens
    patch_ = get_patch(model, "tome")
    assert torch.equal(patch_.state.size.sum(dim=1), torch.full((2, 1), 65.0))


def test_prefix_tokens_are_never_merged():
    model = make_vit("vit_base_patch14_reg4_dinov2")  # CLS + 4 registers
    p = model.num_prefix_tokens
    assert p == 5
    with torch.inference_mode():
        accel.patch(model, tome=accel.ToMe(r=12, trace_source=True))
        model(images(2))
    source = accel.tome.get_source(model)
    assert torch.equal(source[:, :p, :p], torch.eye(p).expand(2, -1, -1))
    assert source[:, :p, p:].sum() == 0 and source[:, p:, :p].sum() == 0
    assert torch.equal(source.sum(dim=1), torch.ones(2, source.shape[2]))  # every input in one group
    groups = accel.tome.patch_groups(model)
    assert groups.shape == (2, 64 + p) and torch.equal(groups[:, :p], torch.arange(p).expand(2, -1))


def test_batch_items_are_merged_independently():
    model = make_vit()
    x = images(3)
    with torch.inference_mode():
        accel.patch(model, tome=9)
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    model = make_vit()
    x = images(2)
    with torch.inference_mode():
        ref = accel.patch(make_vit(), tome=6)(x)
        model = model.to(dtype)
        base = model(x.to(dtype))
        accel.patch(model, tome=0)
        assert torch.equal(model(x.to(dtype)), base)
        accel.patch(model, tome=6)
        out = model(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1).min() > 0.98


def test_state_dict_round_trip():
    model = make_vit()
    keys = list(model.state_dict())
    accel.patch(model, tome=6)
    assert list(model.state_dict()) == keys
    fresh = accel.patch(make_vit(seed=7), tome=6)
    fresh.load_state_dict(model.state_dict())
    plain = make_vit(seed=9)
    plain.load_state_dict(model.state_dict())
    x = images(2)
    with torch.inference_mode():
        assert torch.equal(fresh(x), model(x))
        assert torch.equal(plain(x), accel.unpatch(model)(x))


def test_forward_intermediates_needs_token_layout():
    model = accel.patch(make_vit(), tome=4)
    x = images(1)
    with torch.inference_mode():
        with pytest.raises(NotImplementedError, match="output_fmt='NLC'"):
            model.forward_intermediates(x)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
    assert [t.shape[1] for t in inter] == [60, 56, 52, 48]  # 64 patches minus 4 per block


def test_attention_masks_pass_through_at_r0_and_are_refused_when_merging():
    model = make_vit()
    x = images(2)
    mask = torch.zeros(65, 65)
    mask[:, 40:] = float("-inf")  # hide the last patches from every query
    with torch.inference_mode():
        ref = model(x, attn_mask=mask)
        accel.patch(model, tome=0)
        assert torch.equal(model(x, attn_mask=mask), ref)
        accel.patch(model, tome=4)
        with pytest.raises(ValueError, match="attn_mask/is_causal cannot be combined"):
            model(x, attn_mask=mask)


def test_training_mode_backward():
    model = make_vit(drop_path_rate=0.1).train()
    accel.patch(model, tome=6)
    loss = model(images(2)).logsumexp(dim=-1).mean()
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("builder", ["eva", "attention_pool", "parallel_blocks"])
def test_models_tome_cannot_serve_get_type_error_and_stay_untouched(builder):
    from timm.models.vision_transformer import ParallelScalingBlock

    if builder == "eva":
        model = make_vit("eva02_tiny_patch14_224")
    elif builder == "attention_pool":
        model = make_vit("vit_so150m_patch16_reg4_map_256")
    else:
        torch.manual_seed(0)
        model = _vit_class()(**SMALL, num_classes=10, block_fn=ParallelScalingBlock).eval()
    x = images(1)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    with torch.inference_mode():
        ref = model(x)
        with pytest.raises(TypeError, match="supported"):
            accel.patch(model, tome=4)
        assert torch.equal(model(x), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def test_torch_compile_smoke():
    model = accel.patch(make_vit(), tome=6)
    x = images(2)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0  # one graph: nothing in the hooks breaks it
