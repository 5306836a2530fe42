"""RegionCache (after RAS, region-adaptive sampling) on tiny seeded DiT and PixArt transformers and
pipelines: against the unpatched model, a slow masked-update reference (every token computed each
step, skipped tokens' keys/values and outputs then taken from the cache), and token counts."""
import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import accel
from accel.api import get_patch
from tests.conftest import fused_and_patched

torch.set_num_threads(1)


# -- tiny models -------------------------------------------------------------------------------
def dit(seed=0, embeds=10):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=embeds).eval()


def pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4).eval()


def model_kwargs(kind, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "pixart":
        return dict(encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(class_labels=torch.arange(batch) % 10)


@pytest.fixture(scope="module")
def dit_pipe():
    from diffusers import DDIMScheduler, DiTPipeline

    from accel.pipelines.fashion_sd import build_vae

    torch.manual_seed(0)
    pipe = DiTPipeline(transformer=dit(embeds=1000), vae=build_vae().eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart_pipe():
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    from accel.pipelines.fashion_sd import build_vae, load_fashion_sd

    torch.manual_seed(0)
    tokenizer = load_fashion_sd().tokenizer
    encoder = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=12, d_kv=4, d_ff=24, num_layers=1,
                                      num_heads=2)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=build_vae().eval(),
                               transformer=pixart(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, steps=8, batch=2, guidance=3.0):
    with torch.inference_mode():
        if type(pipe).__name__ == "DiTPipeline":
            return pipe(class_labels=list(range(batch)), num_inference_steps=steps, guidance_scale=guidance,
                        output_type="pt", generator=torch.Generator().manual_seed(0)).images
        return pipe(["a photo of a bag", "a sneaker", "a shirt"][:batch], num_inference_steps=steps,
                    guidance_scale=guidance, output_type="latent", clean_caption=False, max_sequence_length=16,
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images


def hooked(model):
    return [name for name, m in model.named_modules() if "_accel_hooks" in vars(m)]


# -- the slow reference ------------------------------------------------------------------------
def slow_scores(source, previous, patch, metric):
    """[B, C, H, W] -> [B][N] python floats, one patch at a time."""
    b, _, height, width = source.shape
    out = []
    for row in range(b):
        scores = []
        for i in range(height // patch):
            for j in range(width // patch):
                cut = (row, slice(None), slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch))
                values = source[cut].double().flatten()
                if metric == "delta":
                    scores.append((values - previous[cut].double().flatten()).norm().item())
                elif metric == "std":
                    scores.append(values.std().item())
                else:
                    scores.append(values.norm().item())
        out.append(scores)
    return out


class SlowChooser:
    """Focus scores, starvation and region choice, written out per row with python lists."""

    def __init__(self, cfg, h, w, patch):
        self.cfg, self.h, self.w, self.patch = cfg, h, w, patch
        self.scores = self.skipped = self.previous = None

    def observe(self, source, computed):
        """source: [B, C, H, W] output the scheduler integrates; computed: [B][N] bools of the last call."""
        previous, self.previous = self.previous, source.clone()
        if self.cfg.metric == "delta" and previous is None:
            return
        new = slow_scores(source, previous, self.patch, self.cfg.metric)
        if self.scores is None:
            self.scores, self.skipped = new, [[0] * len(r) for r in new]
            return
        for b, row in enumerate(new):
            for t, value in enumerate(row):
                if computed[b][t]:
                    self.scores[b][t], self.skipped[b][t] = value, 0
                else:
                    self.skipped[b][t] += 1

    def choose(self, count):
        """[B][count] sorted token ids: whole regions by mean score, ties to the lower region id."""
        win, h, w = self.cfg.window, self.h, self.w
        regions = {}
        for i in range(h):
            for j in range(w):
                regions.setdefault((i // win, j // win), []).append(i * w + j)
        ids = sorted(regions)
        chosen = []
        for b in range(len(self.scores)):
            eff = [s * torch.exp(torch.tensor(self.cfg.starvation * d, dtype=torch.float64)).item()
                   for s, d in zip(self.scores[b], self.skipped[b])]
            means = [sum(eff[t] for t in regions[r]) / len(regions[r]) for r in ids]
            order = sorted(range(len(ids)), key=lambda k: (-means[k], k))
            tokens = [t for k in order for t in sorted(regions[ids[k]])]
            chosen.append(sorted(tokens[:count]))
        return chosen


class CachedKV:
    """attn1 processor of the reference: every query computed; with a mask, the skipped tokens'
    keys/values come from their attention input when last computed."""

    def __init__(self):
        self.inner, self.cache, self.mask = AttnProcessor2_0(), None, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.mask is None:
            self.cache = hidden_states
            return self.inner(attn, hidden_states, None, attention_mask)
        context = torch.where(self.mask[..., None], hidden_states, self.cache)
        self.cache = context
        return self.inner(attn, hidden_states, context, attention_mask)


def full_steps(cfg, steps):
    return [s for s in range(steps) if s < cfg.warmup or (cfg.refresh and (s - cfg.warmup) % cfg.refresh
                                                           == cfg.refresh - 1)]


def trajectory(model, kind, steps, batch, dtype=torch.float32):
    """A denoising-like run of a bare transformer: x <- x - 0.1 * eps, one call per step."""
    x = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    kwargs = model_kwargs(kind, batch)
    kwargs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    outs = []
    with torch.inference_mode():
        for s in range(steps):
            out = model(x, timestep=torch.full((batch,), 950 - 100 * s), **kwargs).sample
            outs.append(out)
            x = x - 0.1 * out[:, :4]
    return torch.stack(outs)


def masked_reference(model, kind, cfg, steps, batch):
    """Every token through every block each step; skipped tokens' K/V and outputs from the cache."""
    model = copy.deepcopy(model)
    procs = [CachedKV() for _ in model.transformer_blocks]
    for block, proc in zip(model.transformer_blocks, procs):
        block.attn1.set_processor(proc)
    chooser, n = SlowChooser(cfg, 8, 8, 2), 64
    count = max(1, round(cfg.ratio * n))
    x = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs, outs, previous = model_kwargs(kind, batch), [], None
    full = full_steps(cfg, steps)
    with torch.inference_mode():
        for s in range(steps):
            cached = s not in full and count < n and chooser.scores is not None
            mask = torch.zeros(batch, n, dtype=torch.bool)
            if cached:
                for b, tokens in enumerate(chooser.choose(count)):
                    mask[b, tokens] = True
            else:
                mask[:] = True
            for proc in procs:
                proc.mask = mask if cached else None
            out = model(x, timestep=torch.full((batch,), 950 - 100 * s), **kwargs).sample
            if cached:
                pixels = mask.reshape(batch, 1, 8, 8).repeat_interleave(2, 2).repeat_interleave(2, 3)
                out = torch.where(pixels, out, previous)
            previous = out
            chooser.observe(out[:, :4], mask.tolist())
            outs.append(out)
            x = x - 0.1 * out[:, :4]
    return torch.stack(outs)


# -- tests -------------------------------------------------------------------------------------
SETTINGS = [
    accel.RegionCache(ratio=0.5, warmup=2, refresh=4, window=2, metric="delta", starvation=0.5),
    accel.RegionCache(ratio=0.25, warmup=1, refresh=0, window=1, metric="std", starvation=0.0),
    accel.RegionCache(ratio=0.3, warmup=3, refresh=3, window=3, metric="l2norm", starvation=1.0),
]


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("cfg", SETTINGS, ids=["delta-w2", "std-w1", "l2norm-w3"])
def test_patched_equals_the_masked_update_reference(kind, cfg):
    model = dit() if kind == "dit" else pixart()
    expected = masked_reference(model, kind, cfg, steps=9, batch=3)
    accel.patch(model, region_cache=cfg)
    got = trajectory(model, kind, steps=9, batch=3)
    info = accel.describe(model)["methods"]["region_cache"]["last_call"]
    count = max(1, round(cfg.ratio * 64))
    assert info["full_steps"] == full_steps(cfg, 9)
    assert info["tokens_per_step"] == [64 if s in info["full_steps"] else count for s in range(9)]
    assert len(info["full_steps"]) < 9
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_ratio_one_equals_unpatched_and_unpatch_is_bit_exact(kind, dit_pipe, pixart_pipe):
    pipe = dit_pipe if kind == "dit" else pixart_pipe
    keys = list(pipe.transformer.state_dict())
    reference = draw(pipe)
    accel.patch(pipe, region_cache=1.0)
    assert torch.equal(draw(pipe), reference)
    assert set(accel.describe(pipe)["methods"]["region_cache"]["last_call"]["tokens_per_step"]) == {64}
    accel.patch(pipe, region_cache=0.5)
    cached = draw(pipe)
    assert not torch.equal(cached, reference)
    assert torch.nn.functional.cosine_similarity(cached.flatten(), reference.flatten(), dim=0) > 0.9
    assert list(pipe.transformer.state_dict()) == keys
    accel.unpatch(pipe)
    assert torch.equal(draw(pipe), reference)
    assert hooked(pipe.transformer) == [] and "_accel_hooks" not in vars(pipe.scheduler)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_tokens_entering_the_blocks_on_cached_steps(dit_pipe, ratio):
    seen = {"queries": [], "mlp": []}
    block = dit_pipe.transformer.transformer_blocks[1]
    handles = [block.attn1.register_forward_pre_hook(lambda m, a, kw: seen["queries"].append(a[0].shape[1]),
                                                     with_kwargs=True),
               block.ff.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].shape[1]))]
    cfg = accel.RegionCache(ratio=ratio, warmup=2, refresh=3)
    try:
        with accel.patched(dit_pipe, region_cache=cfg):
            draw(dit_pipe, steps=8, batch=3)
            info = accel.describe(dit_pipe)["methods"]["region_cache"]["last_call"]
    finally:
        for h in handles:
            h.remove()
    full = full_steps(cfg, 8)
    expected = [64 if s in full else round(ratio * 64) for s in range(8)]
    assert seen["queries"] == expected and seen["mlp"] == expected
    assert info["tokens_per_step"] == expected and info["full_steps"] == full == [0, 1, 4, 7]
    computed = torch.tensor(info["computed_steps"])  # [2 * 3, 8, 8]
    assert computed.shape == (6, 8, 8)
    assert (computed.flatten(1).sum(1) == sum(expected)).all()


@pytest.mark.parametrize("kind,batch", [("dit", 3), ("pixart", 1), ("pixart", 3)])
def test_guidance_halves_share_the_choice_made_on_the_guided_output(kind, batch, dit_pipe, pixart_pipe):
    """Under classifier-free guidance both halves compute the same tokens, chosen on the output the
    scheduler integrates (slow reference on the recorded guided outputs)."""
    pipe = dit_pipe if kind == "dit" else pixart_pipe
    cfg = accel.RegionCache(ratio=0.25, warmup=2, refresh=0, window=2, starvation=0.3)
    sources, outputs = [], []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, *a, **kw: (sources.append(model_output.clone()),
                                                          step(model_output, *a, **kw))[1]
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, out: outputs.append((out[0] if isinstance(out, tuple) else out.sample).clone()))
    try:
        with accel.patched(pipe, region_cache=cfg):
            draw(pipe, steps=6, batch=batch)
    finally:
        handle.remove()
        del pipe.scheduler.step
    chooser = SlowChooser(cfg, 8, 8, 2)
    rows = sources[0].shape[0]
    for s in range(6):
        out = outputs[s]
        assert out.shape[0] == 2 * batch
        if s < cfg.warmup:
            computed = [[True] * 64 for _ in range(rows)]
        else:
            equal = (out == outputs[s - 1]).all(dim=1)  # [2B, 16, 16]
            reused = equal.reshape(2 * batch, 8, 2, 8, 2).all(dim=4).all(dim=2).reshape(2 * batch, 64)
            kept = [sorted((~reused[b]).nonzero().flatten().tolist()) for b in range(2 * batch)]
            assert kept[:batch] == kept[batch:]  # cond and uncond halves: one choice
            expected = chooser.choose(16)
            if rows == 2 * batch:  # DiT: the scheduler sees both halves (the guided output twice)
                assert kept == expected
            else:
                assert kept[:batch] == expected
            computed = [[t in k for t in range(64)] for k in kept[:rows]]
        chooser.observe(sources[s], computed)


def test_odd_batch_without_guidance_and_state_reset_between_calls(dit_pipe):
    reference = draw(dit_pipe, steps=8, batch=3, guidance=1.0)
    with accel.patched(dit_pipe, region_cache=accel.RegionCache(ratio=0.5, warmup=2)):
        first = draw(dit_pipe, steps=8, batch=3, guidance=1.0)
        info = accel.describe(dit_pipe)["methods"]["region_cache"]["last_call"]
        second = draw(dit_pipe, steps=8, batch=3, guidance=1.0)
        assert accel.describe(dit_pipe)["methods"]["region_cache"]["last_call"] == info
    assert torch.equal(first, second)  # each call starts from warm-up with fresh caches
    assert not torch.equal(first, reference) and (first - reference).abs().mean() < 0.1
    assert info["steps"] == 8 and info["tokens_per_step"][:2] == [64, 64] and 32 in info["tokens_per_step"]
    assert len(info["computed_steps"]) == 3


def test_bare_transformer_counts_calls_until_reset():
    model = dit()
    cfg = accel.RegionCache(ratio=0.5, warmup=2, refresh=0)
    accel.patch(model, region_cache=cfg)
    first = trajectory(model, "dit", 5, 2)
    assert accel.describe(model)["methods"]["region_cache"]["last_call"]["tokens_per_step"] == [64, 64, 32, 32, 32]
    continued = trajectory(model, "dit", 2, 2)  # same run: no warm-up, the caches carry on
    assert accel.describe(model)["methods"]["region_cache"]["last_call"]["tokens_per_step"][-2:] == [32, 32]
    assert not torch.equal(continued, first[:2])
    accel.region_cache.reset(model)
    assert torch.equal(trajectory(model, "dit", 5, 2), first)
    accel.unpatch(model)
    with pytest.raises(ValueError, match="region_cache is not patched"):
        accel.region_cache.reset(model)


def test_bfloat16_ratio_one_exact_and_cached_close():
    model = dit().to(torch.bfloat16)
    reference = trajectory(model, "dit", 6, 2, torch.bfloat16)
    with accel.patched(model, region_cache=1.0):
        assert torch.equal(trajectory(model, "dit", 6, 2, torch.bfloat16), reference)
    with accel.patched(model, region_cache=accel.RegionCache(ratio=0.5, warmup=2)):
        cached = trajectory(model, "dit", 6, 2, torch.bfloat16)
    assert cached.dtype == torch.bfloat16 and torch.isfinite(cached.float()).all()
    assert torch.equal(cached[:2], reference[:2]) and not torch.equal(cached, reference)


@pytest.mark.parametrize("value,error,match", [
    (0.0, ValueError, "ratio"), (1.5, ValueError, "ratio"), (True, TypeError, "region_cache"),
    ("half", TypeError, "region_cache"), ({"ratio": 0.5, "window": 0}, ValueError, "window"),
    ({"metric": "entropy"}, ValueError, "metric"), ({"warmup": 1}, ValueError, "warmup >= 2"),
    ({"starvation": -1.0}, ValueError, "starvation"), ({"refresh": 1.5}, TypeError, "refresh"),
    ({"ratios": 0.5}, ValueError, "unknown settings"),
])
def test_bad_settings_raise_and_leave_the_model_untouched(value, error, match):
    model = dit()
    with pytest.raises(error, match=match):
        accel.patch(model, region_cache=value)
    assert hooked(model) == []


def test_unsupported_models_raise_naming_what_is_supported():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4)
    from accel.patches.region_cache.diffusers import RegionCacheDiT

    matches = RegionCacheDiT.matches

    for obj in (unet, torch.nn.Linear(2, 2)):
        assert not matches(obj)
        with pytest.raises(TypeError, match="DiTTransformer2DModel and PixArtTransformer2DModel"):
            accel.patch(obj, region_cache=0.5)
        assert hooked(obj) == []


def test_matches_and_describe(dit_pipe):
    from accel.patches.region_cache.diffusers import RegionCacheDiT

    matches = RegionCacheDiT.matches

    assert matches(dit_pipe) and matches(dit_pipe.transformer) and matches(pixart())
    assert not matches(dit_pipe.vae)
    with accel.patched(dit_pipe, region_cache=0.5):
        info = accel.describe(dit_pipe)["methods"]["region_cache"]
        assert info["settings"]["ratio"] == 0.5 and info["model"] == "DiTTransformer2DModel" and info["blocks"] == 2
        assert "transformer.transformer_blocks.1.attn1" in info["patched"]["modules"]
        assert info["last_call"] is None
        assert get_patch(dit_pipe, "region_cache") is not None
    assert get_patch(dit_pipe, "region_cache") is None


def test_refuses_a_model_patched_with_tome():
    model = dit()
    accel.patch(model, tome=0.5)
    with pytest.raises(ValueError, match="tome"):
        accel.patch(model, region_cache=0.5)
    assert get_patch(model, "region_cache") is None and get_patch(model, "tome") is not None
    accel.unpatch(model)
    assert hooked(model) == []


@pytest.mark.parametrize("order", ["fuse, then patch", "patch, then fuse"])
def test_fused_qkv_projections(order):
    """PixArt's ``fuse_qkv_projections()`` leaves self-attention no key/value projection for the
    cached tokens; cached steps still equal those of the unfused model (float tolerance)."""
    cfg = accel.RegionCache(ratio=0.5, warmup=2, refresh=0)
    expected = trajectory(accel.patch(pixart(), region_cache=cfg), "pixart", 5, 2)
    model = fused_and_patched(pixart(), order, region_cache=cfg)
    cached = trajectory(model, "pixart", 5, 2)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
    assert accel.describe(model)["methods"]["region_cache"]["last_call"]["tokens_per_step"][2:] == [32, 32, 32]
