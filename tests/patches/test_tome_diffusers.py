"""ToMe / ToDo on diffusers UNets, PixArt and DiT: against a slow reference built from diffusers' own
block forward, the unpatched model, and known token counts. Tiny seeded models, no download."""
import copy

import pytest
import torch
import torch.nn.functional as F

import accel
from accel.api import get_patch
from tests.conftest import fused_and_patched, make_vit
from tests.patches.test_tome_merge2d import offsets_for, reference_groups


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sd_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8).eval()


def sdxl_unet(seed=0):
    """SDXL's layout: no attention at the top level, 2 transformer layers per block, text_time embedding."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    ).eval()


def pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4).eval()


def dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval()


BUILDERS = {"sd": sd_unet, "sdxl": sdxl_unet, "pixart": pixart, "dit": dit}


def inputs(kind, batch=2, size=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.full((batch,), 500)
    if kind in ("sd", "sdxl"):
        kw = dict(encoder_hidden_states=torch.randn(batch, 5, 16, generator=g))
        if kind == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
        return (x, t), kw
    if kind == "pixart":
        return (x,), dict(timestep=t, encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return (x,), dict(timestep=t, class_labels=torch.arange(batch) % 10)


def run(model, args, kwargs):
    with torch.inference_mode():
        return model(*args, **kwargs).sample


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def hooked_modules(model):
    return [name for name, m in model.named_modules() if "_accel_hooks" in vars(m)]


# -- the slow reference: diffusers' own block forward, attn1 replaced by loop-based merging ------
class MergingAttention(torch.nn.Module):
    """attn1 on merged tokens, one image at a time, with the groups of the loop reference."""

    def __init__(self, attn, latent, gen, ratio, no_rand):
        super().__init__()
        self.attn, self.latent, self.gen, self.ratio, self.no_rand = attn, latent, gen, ratio, no_rand

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        n = hidden_states.shape[1]
        h, w = next((-(-self.latent[0] // d), -(-self.latent[1] // d)) for d in (1, 2, 4, 8)
                    if -(-self.latent[0] // d) * -(-self.latent[1] // d) == n)
        offsets = offsets_for(h, w, 2, 2, 0, True)
        if not self.no_rand:
            offsets = torch.randint(4, (h // 2, w // 2), generator=self.gen)
        out = torch.empty_like(hidden_states)
        for b in range(hidden_states.shape[0]):
            groups, kept = reference_groups(hidden_states[b], h, w, 2, 2, int(n * self.ratio), offsets)
            members = [[k] for k in kept] + list(groups.values())
            tokens = torch.stack([hidden_states[b, m].mean(0) for m in members])[None]
            result = self.attn(tokens, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)
            for i, m in enumerate(members):
                out[b, m] = result[0, i]
        return out


def reference_model(model, latent, ratio, no_rand):
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    patch_ = accel.patch(copy.deepcopy(model), tome=ratio)
    names = {name.split(".", 1)[-1] if name.startswith(("unet.", "transformer.")) else name
             for name in get_patch(patch_, "tome").patched_modules}
    for name, module in ref.named_modules():
        if name in names:
            module.attn1 = MergingAttention(module.attn1, latent, gen, ratio, no_rand)
    return ref


@pytest.mark.parametrize("kind,batch,size", [("sd", 2, (16, 16)), ("sd", 1, (16, 24)), ("sd", 2, (13, 10)),
                                             ("pixart", 2, (16, 16)), ("pixart", 3, (16, 12)), ("dit", 2, (16, 16)),
                                             ("sdxl", 2, (16, 16))])
def test_patched_model_matches_slow_reference(kind, batch, size):
    model = BUILDERS[kind]()
    args, kwargs = inputs(kind, batch, size)
    patch_size = 1 if kind in ("sd", "sdxl") else 2
    latent = (size[0] // patch_size, size[1] // patch_size)
    expected = run(reference_model(model, latent, 0.5, no_rand=batch % 2 == 1), args, kwargs)
    accel.patch(model, tome=0.5)
    out = run(model, args, kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_ratio0_exact_unpatch_bit_exact_and_merging_stays_close(kind):
    model = BUILDERS[kind]()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    args, kwargs = inputs(kind)
    ref = run(model, args, kwargs)
    accel.patch(model, tome=0.0)
    assert torch.equal(run(model, args, kwargs), ref)
    accel.patch(model, tome=accel.ToMe(ratio=0.5, merge_crossattn=True, merge_mlp=True))
    out = run(model, args, kwargs)
    assert not torch.equal(out, ref) and 0.9 < cosine(out, ref) < 1 - 1e-7
    accel.unpatch(model)
    assert torch.equal(run(model, args, kwargs), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def norm_type_blocks():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    yield "layer_norm", sd_unet().down_blocks[0].attentions[0].transformer_blocks[0], {}
    yield "ada_norm", BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, num_embeds_ada_norm=10,
                                            norm_type="ada_norm"), {"timestep": torch.tensor(3)}
    yield "ada_norm_zero", dit().transformer_blocks[0], {
        "timestep": torch.tensor([3, 7]), "class_labels": torch.tensor([1, 2])}
    yield "ada_norm_single", pixart().transformer_blocks[0], {"timestep": torch.randn(2, 6 * 16)}


@pytest.mark.parametrize("norm_type", ["layer_norm", "ada_norm", "ada_norm_zero", "ada_norm_single"])
def test_block_rerun_without_merging_equals_diffusers_block(norm_type):
    """The re-run of a block from its submodules is diffusers' forward when no op changes the tokens."""
    from accel.patches.tome.diffusers import ToMeDiffusers, _Ops

    _, block, kw = next(b for b in norm_type_blocks() if b[0] == norm_type)
    dim = block.norm1.normalized_shape[0] if hasattr(block.norm1, "normalized_shape") else block.dim
    x = torch.randn(2, 16, dim)
    if block.attn2 is not None:
        kw["encoder_hidden_states"] = torch.randn(2, 5, block.attn2.to_k.in_features)
    with torch.inference_mode():
        expected = block(x, **kw)
        got = ToMeDiffusers._run_block(None, block, _Ops(), x, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_pixart_block_ratio0_equal_and_merging_differs_slightly():
    model = pixart()
    block = model.transformer_blocks[0]
    seen = []
    block.register_forward_hook(lambda m, a, out: seen.append(out))
    args, kwargs = inputs("pixart")
    run(model, args, kwargs)
    accel.patch(model, tome=0.0)
    run(model, args, kwargs)
    accel.patch(model, tome=0.5)
    run(model, args, kwargs)
    assert torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[0])
    assert cosine(seen[2], seen[0]) > 0.95


def test_batches_odd_deterministic_even_random_from_own_generator():
    model = accel.patch(sd_unet(), tome=0.5)
    args, kwargs = inputs("sd", batch=3)
    assert torch.equal(run(model, args, kwargs), run(model, args, kwargs))  # top-left destinations
    args, kwargs = inputs("sd", batch=2)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = run(model, args, kwargs)
    assert torch.equal(torch.get_rng_state(), state)  # the pipeline's noise is untouched
    assert not torch.equal(run(model, args, kwargs), first)  # the generator moved on
    accel.patch(model, tome=0.5)  # re-patching re-seeds: the same merges again
    assert torch.equal(run(model, args, kwargs), first)
    accel.patch(model, tome=accel.ToMe(ratio=0.5, seed=1))
    assert not torch.equal(run(model, args, kwargs), first)
    accel.patch(model, tome=accel.ToMe(ratio=0.5, use_rand=False))
    assert torch.equal(run(model, args, kwargs), run(model, args, kwargs))


def token_counts(model, names):
    counts = []
    for name, module in model.named_modules():
        if name.endswith(names):
            module.register_forward_pre_hook(
                lambda m, a, kw, name=name: counts.append(
                    (name.rsplit(".", 1)[-1], (a[0] if a else kw["hidden_states"]).shape[1],
                     None if kw.get("encoder_hidden_states") is None else kw["encoder_hidden_states"].shape[1])),
                with_kwargs=True)
    return counts


def test_non_square_latents_and_last_call_counts():
    model = accel.patch(sd_unet(), tome=0.5)
    counts = token_counts(model, ("attn1", "attn2", "ff"))
    args, kwargs = inputs("sd", size=(16, 24))
    run(model, args, kwargs)
    last = get_patch(model, "tome").last_call()
    assert last == {"latent": [16, 24], "per_downsample": {1: {"grid": [16, 24], "blocks": 3, "tokens": 384,
                                                               "merged": 192}}}
    top = [c for c in counts if c[0] == "attn1" and c[1] != 96]  # level-2 blocks are untouched
    assert top == [("attn1", 192, None)] * 3
    assert ("attn2", 384, 5) in counts and ("ff", 384, None) in counts
    assert ("attn1", 96, None) in counts


def test_merge_crossattn_and_mlp_variants_shrink_those_ops():
    model = accel.patch(sd_unet(), tome=accel.ToMe(ratio=0.5, merge_attn=False, merge_crossattn=True,
                                                   merge_mlp=True))
    counts = token_counts(model, ("attn1", "attn2", "ff"))
    args, kwargs = inputs("sd")
    out = run(model, args, kwargs)
    top = [c for c in counts if c[1] in (128, 256)]
    assert sorted(set(top)) == [("attn1", 256, None), ("attn2", 128, 5), ("ff", 128, None)]
    accel.patch(model, tome=0.5)
    assert not torch.equal(run(model, args, kwargs), out)


def test_downsample_mode_identity_close_and_shorter_keys():
    model = sd_unet()
    args, kwargs = inputs("sd", size=(16, 24))
    ref = run(model, args, kwargs)
    accel.patch(model, tome=accel.ToMe(mode="downsample", downsample_factor=1))
    assert torch.equal(run(model, args, kwargs), ref)
    counts = token_counts(model, ("attn1",))
    for method in ("nearest", "avg"):
        accel.patch(model, tome=accel.ToMe(mode="downsample", downsample_method=method))
        out = run(model, args, kwargs)
        assert not torch.equal(out, ref) and cosine(out, ref) > 0.9
        last = get_patch(model, "tome").last_call()["per_downsample"]
        assert last == {1: {"grid": [16, 24], "blocks": 3, "tokens": 384, "kv_tokens": 96}}
    assert ("attn1", 384, 96) in counts  # queries full, keys/values a quarter
    assert ("attn1", 96, None) in counts  # level 2 untouched (max_downsample defaults to 1)
    accel.patch(model, tome=accel.ToMe(mode="downsample", max_downsample=2, downsample_factor=2))
    run(model, args, kwargs)
    assert ("attn1", 96, 24) in counts
    accel.unpatch(model)
    assert torch.equal(run(model, args, kwargs), ref)


def test_describe_sdxl_merges_only_at_its_first_attention_level():
    model = accel.patch(sdxl_unet(), tome=0.5)
    info = accel.describe(model)["methods"]["tome"]
    assert info["max_downsample"] == 2 and info["resolutions"] == {2: {"blocks": 8, "grid": None}}
    assert info["patched"]["count"] == 8 and info["last_call"] is None
    run(model, *inputs("sdxl"))
    info = accel.describe(model)["methods"]["tome"]
    assert info["resolutions"] == {2: {"blocks": 8, "grid": [8, 8]}}
    assert info["last_call"]["per_downsample"] == {2: {"grid": [8, 8], "blocks": 8, "tokens": 64, "merged": 32}}
    with pytest.raises(ValueError, match="UNet2DConditionModel has no transformer block at downsample <= 1"):
        accel.patch(model, tome=accel.ToMe(ratio=0.5, max_downsample=1))
    assert accel.describe(model)["methods"]["tome"]["settings"]["max_downsample"] is None  # kept the old patch


@pytest.mark.parametrize("value,error,match", [
    (-0.5, ValueError, r"ratio must be in \[0, 1\)"),
    (dict(ratio=0.5, sx=0), ValueError, "sx must be an int >= 1"),
    (dict(ratio=0.5, sy=2.0), TypeError, "sy must be an int"),
    (dict(ratio=0.5, max_downsample=3), ValueError, "max_downsample must be one of 1, 2, 4, 8"),
    (dict(ratio=0.5, mode="x"), ValueError, "mode must be one of 'merge', 'downsample'"),
    (dict(mode="downsample", downsample_factor=0), ValueError, "downsample_factor must be an int >= 1"),
    (dict(mode="downsample", ratio=0.5), ValueError, "ratio applies to mode='merge'"),
    (dict(ratio=0.5, downsample_method="avg"), ValueError, "applies to mode='downsample'"),
    (dict(ratio=0.5, use_rand=1), TypeError, "use_rand must be a bool"),
    (dict(ratio=0.5, merge_attn=False), ValueError, "nothing would merge"),
    (4, ValueError, "r is a timm ViT setting.*UNet2DConditionModel is a diffusion model"),
    (dict(), ValueError, "UNet2DConditionModel needs ratio"),
])
def test_bad_settings_raise_and_leave_the_model_unpatched(value, error, match):
    model = sd_unet()
    args, kwargs = inputs("sd", batch=1)
    ref = run(model, args, kwargs)
    with pytest.raises(error, match=match):
        accel.patch(model, tome=value)
    assert hooked_modules(model) == [] and "_accel_patches" not in vars(model)
    assert torch.equal(run(model, args, kwargs), ref)


def test_diffusion_settings_are_refused_for_vits():
    with pytest.raises(ValueError, match="sx, mode are diffusion setting"):
        accel.patch(make_vit(), tome=accel.ToMe(r=4, sx=3, mode="downsample"))
    with pytest.raises(ValueError, match="need r"):
        accel.patch(make_vit(), tome=0.5)


def test_unsupported_models_type_error_and_no_block_value_error():
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4)
    with pytest.raises(TypeError, match="not supported; supported: .*UNet2DConditionModel, PixArtTransformer2DModel"):
        accel.patch(sd3, tome=0.5)
    plain = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2,
                                 mid_block_type="UNetMidBlock2D", cross_attention_dim=16)
    with pytest.raises(ValueError, match="UNet2DConditionModel has no transformer block"):
        accel.patch(plain, tome=0.5)
    assert hooked_modules(plain) == []


def test_fashion_sd_pipeline_end_to_end():
    from accel.pipelines import load

    pipe = load("fashion-sd")

    def draw(batch=1):
        return pipe(["a photo of a bag"] * batch, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    with torch.inference_mode():
        ref = draw()
        accel.patch(pipe, tome=0.5)
        # one patch, recorded on the pipeline and on the UNet it hooks: the two are one patched object
        assert vars(pipe)["_accel_patches"]["tome"] is vars(pipe.unet)["_accel_patches"]["tome"]
        out = draw()
        info = accel.describe(pipe)["methods"]["tome"]
        assert info["last_call"] == {"latent": [16, 16], "per_downsample": {
            1: {"grid": [16, 16], "blocks": 3, "tokens": 256, "merged": 128}}}  # CFG: batch 2, random
        assert set(info["patched"]["modules"]) == {"__call__", "unet.down_blocks.0.attentions.0.transformer_blocks.0",
                                                   "unet.up_blocks.1.attentions.0.transformer_blocks.0",
                                                   "unet.up_blocks.1.attentions.1.transformer_blocks.0"}
        assert out.shape == ref.shape == (1, 1, 32, 32) and not torch.equal(out, ref)
        assert (out - ref).abs().mean() < 0.1
        assert draw(3).shape == (3, 1, 32, 32)
        accel.unpatch(pipe)
        assert torch.equal(draw(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    model = sd_unet()
    args, kwargs = inputs("sd")
    expected = run(accel.patch(sd_unet(), tome=0.5), args, kwargs)
    model = accel.patch(model.to(dtype), tome=0.5)
    low_args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    out = run(model, low_args, {k: v.to(dtype) for k, v in kwargs.items()})
    assert out.dtype == dtype and torch.isfinite(out).all() and cosine(out.float(), expected) > 0.99


@pytest.mark.parametrize("order", ["fuse, then patch", "patch, then fuse"])
@pytest.mark.parametrize("kind", ["sd", "pixart"])
def test_todo_and_merging_with_fused_qkv_projections(kind, order):
    """``fuse_qkv_projections()`` leaves self-attention only a fused q/k/v projection; ToDo's keys and
    values from the downsampled grid still come out as on the unfused model (float tolerance)."""
    args, kwargs = inputs(kind, batch=2)
    for setting in (accel.ToMe(mode="downsample"), accel.ToMe(ratio=0.5)):
        expected = run(accel.patch(BUILDERS[kind](), tome=setting), args, kwargs)
        model = fused_and_patched(BUILDERS[kind](), order, tome=setting)
        assert any(getattr(m, "to_qkv", None) is not None for m in model.modules())
        torch.testing.assert_close(run(model, args, kwargs), expected, rtol=1e-4, atol=1e-5)
        accel.unpatch(model)
        fused = BUILDERS[kind]()
        fused.fuse_qkv_projections()
        assert torch.equal(run(model, args, kwargs), run(fused, args, kwargs))


def test_todo_on_a_pipeline_fused_after_patching():
    from accel.pipelines import load

    def draw(pipe):
        with torch.inference_mode():
            return pipe(["a photo of a bag"] * 2, num_inference_steps=2, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images

    expected = draw(accel.patch(load("fashion-sd"), tome=accel.ToMe(mode="downsample")))
    pipe = accel.patch(load("fashion-sd"), tome=accel.ToMe(mode="downsample"))
    pipe.fuse_qkv_projections()
    torch.testing.assert_close(draw(pipe), expected, rtol=1e-4, atol=1e-5)
