"""DeepCache on diffusers UNet pipelines: schedules against hand-written lists, full-UNet counts,
a hand-computed shallow step, exactness bars (identity, unpatch), samplers that repeat timesteps,
img2img/inpaint/ControlNet pipelines and the bare UNet. Uses the trained offline fashion-sd."""
import pytest
import torch

import accel
from accel.api import get_patch
from accel.patches.deepcache import DeepCache, DeepCacheSchedule

STEPS = 10
PROMPT = "a photo of a bag"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd_pipe():
    import accel.pipelines

    return accel.pipelines.load("fashion-sd")


@pytest.fixture
def pipe(sd_pipe):
    """The shared pipeline; unpatched (and its scheduler and dtype restored) after each test."""
    scheduler, cls = sd_pipe.scheduler, type(sd_pipe)
    yield sd_pipe
    for obj in (sd_pipe, sd_pipe.unet):
        if get_patch(obj, "deepcache") is not None:
            accel.unpatch(obj, "deepcache")
    sd_pipe.scheduler = scheduler
    if sd_pipe.unet.dtype != torch.float32:
        sd_pipe.to(torch.float32)
    assert type(sd_pipe) is cls


def run(pipe, steps=STEPS, guidance=3.0, seed=0, **kwargs):
    """Final latents [1, 4, 16, 16] of a seeded call."""
    kwargs.setdefault("prompt", PROMPT)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return pipe(num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                    generator=gen, **kwargs).images


class Counter:
    """Counts real executions of a module (a plain forward hook on a submodule the block runs)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def deep_counter(unet):
    return Counter(unet.down_blocks[-1].resnets[0])


# -- schedule (pure) ----------------------------------------------------------------------------
@pytest.mark.parametrize("interval, expected", [
    (2, [0, 2, 4, 6, 8]),
    (3, [0, 3, 6, 9]),
    (5, [0, 5]),
    (1, list(range(10))),
])
def test_uniform_schedule(interval, expected):
    schedule = DeepCacheSchedule(interval)
    assert schedule.full_steps(10) == expected
    assert [s for s in range(10) if schedule.is_full(s)] == expected


def test_non_uniform_schedule():
    # T=10, N=3, c=3 (0.3 of 10), p=1.4: warped points -2.19, -0.26, 1.67, 3.60 -> 0, 2.85, 5.05, 9
    assert DeepCacheSchedule(3, "non-uniform", 0.3, 1.4).full_steps(10) == [0, 3, 5, 9]
    assert DeepCacheSchedule(3, "non-uniform", 3, 1.4).full_steps(10) == [0, 3, 5, 9]  # int centre
    # T=20, N=2, c=6, p=3: points map to 0, 4, 5, 6, 6, 6, 7, 9, 13, 19; the two duplicates are
    # refilled with the free steps nearest the centre (8, then 3)
    assert DeepCacheSchedule(2, "non-uniform", 6, 3.0).full_steps(20) == [0, 3, 4, 5, 6, 7, 8, 9, 13, 19]
    for steps, interval in [(50, 3), (50, 5), (7, 2), (25, 4), (3, 10)]:
        full = DeepCacheSchedule(interval, "non-uniform").full_steps(steps)
        assert full[0] == 0 and len(full) == len(DeepCacheSchedule(interval).full_steps(steps))
        assert len(set(full)) == len(full) and full[-1] < steps
    # denser around the centre than far from it (paper, Sec. 3.3)
    full = DeepCacheSchedule(3, "non-uniform", 0.3, 1.4).full_steps(50)
    gaps = [b - a for a, b in zip(full, full[1:])]
    assert min(gaps) == 1 and max(gaps) >= 4
    assert DeepCacheSchedule(1, "non-uniform").full_steps(6) == list(range(6))


# -- config -------------------------------------------------------------------------------------
def test_config_coerce_and_errors():
    assert DeepCache.coerce(3) == DeepCache(interval=3)
    assert DeepCache.coerce({"interval": 4, "branch": 1}) == DeepCache(interval=4, branch=1)
    for kwargs, word in [({"interval": 0}, "interval"), ({"branch": -1}, "branch"),
                         ({"schedule": "x"}, "schedule"), ({"center": 1.5}, "center"),
                         ({"center": -2}, "center"), ({"power": 0.0}, "power")]:
        with pytest.raises(ValueError, match=word):
            DeepCache(**kwargs)
    for value in [3.0, "3", True, None]:
        with pytest.raises(TypeError):
            DeepCache.coerce(value)
    with pytest.raises(TypeError, match="center"):
        DeepCache(center="mid")


# -- pipeline: counts, reset, exactness ---------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])  # 3.0: classifier-free guidance doubles the batch
def test_full_unet_calls_counted(pipe, guidance):
    accel.patch(pipe, deepcache=3)
    deep, shallow = deep_counter(pipe.unet), Counter(pipe.unet.up_blocks[-1].resnets[-1])  # branch 0 keeps it
    try:
        run(pipe, guidance=guidance)
    finally:
        deep.handle.remove()
        shallow.handle.remove()
    assert (deep.calls, shallow.calls) == (4, STEPS)
    report = accel.describe(pipe)["methods"]["deepcache"]["last_call"]
    assert report["full_steps"] == [0, 3, 6, 9]
    assert (report["steps"], report["unet_calls"], report["full_unet_calls"]) == (STEPS, STEPS, 4)


def test_state_resets_between_calls_and_identity(pipe):
    cls = type(pipe)
    reference = run(pipe)
    accel.patch(pipe, deepcache=DeepCache(interval=3))
    first, second = run(pipe), run(pipe)
    assert torch.equal(first, second)
    assert not torch.allclose(first, reference)  # shallow steps did change something
    accel.patch(pipe, deepcache=1)  # patching again replaces the settings
    assert get_patch(pipe, "deepcache").config.interval == 1
    assert type(pipe).__bases__ == (cls,)  # one subclass level, not two
    assert torch.equal(run(pipe), reference)


def test_unpatch_is_bit_exact(pipe):
    cls = type(pipe)
    reference = run(pipe)
    accel.patch(pipe, deepcache=DeepCache(interval=2, schedule="non-uniform"))
    assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    run(pipe)
    assert get_patch(pipe, "deepcache").last_call()["full_steps"] == [0, 2, 4, 6, 9]  # c=3, p=1.4
    accel.unpatch(pipe)
    assert type(pipe) is cls
    assert not hasattr(pipe.unet, "_accel_hooks") and not hasattr(pipe.scheduler, "_accel_hooks")
    assert torch.equal(run(pipe), reference)


def test_patched_to_float64(pipe):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    accel.patch(pipe, deepcache=3)
    latents32 = run(pipe, latents=noise)
    pipe.to(torch.float64)
    deep = deep_counter(pipe.unet)
    latents64 = run(pipe, latents=noise.double())
    deep.handle.remove()
    assert latents64.dtype == torch.float64 and deep.calls == 4
    torch.testing.assert_close(latents64.float(), latents32, atol=1e-3, rtol=1e-3)


def test_accelerate_hook_on_top(pipe):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    reference = run(pipe)
    accel.patch(pipe, deepcache=3)
    patched = run(pipe)
    add_hook_to_module(pipe.unet, ModelHook())
    assert torch.equal(run(pipe), patched)
    accel.unpatch(pipe)
    assert torch.equal(run(pipe), reference)  # our trampoline stays as a pass-through under accelerate's
    remove_hook_from_module(pipe.unet)
    assert torch.equal(run(pipe), reference)


def test_other_hooks_inside_the_unet(pipe):
    """Another method's hooks on the transformer blocks (as ToMe's are) compose either way round."""
    from accel.hooks import HookGroup

    blocks = [m for name, m in pipe.unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    calls = []
    other = HookGroup()

    def count(module, call_next, *args, **kwargs):
        calls.append(module)
        return call_next(*args, **kwargs)

    accel.patch(pipe, deepcache=3)
    patched = run(pipe)
    for block in blocks:
        other.add(block, count)
    assert torch.equal(run(pipe), patched) and len(calls) < STEPS * len(blocks)  # skipped blocks do not run
    accel.unpatch(pipe)
    calls.clear()
    run(pipe)
    assert len(calls) == STEPS * len(blocks)
    other.remove_all()
    assert not any(hasattr(block, "_accel_hooks") for block in blocks)


# -- the shallow step against a hand-computed reference -----------------------------------------
def unet_inputs(unet, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 8, unet.config.cross_attention_dim, generator=gen)
    return x, context


def shallow_reference(unet, x, t, context, deep_feature):
    """Branch 0 by hand (paper, Eq. 4): conv_in and the time embedding, then only the last layer
    of the last up block, on the cached deep feature and conv_in's output, then conv_out."""
    emb = unet.time_embedding(unet.time_proj(t.expand(x.shape[0])).to(x.dtype))
    h = unet.conv_in(x)
    up = unet.up_blocks[-1]
    h = up.resnets[-1](torch.cat([deep_feature, h], dim=1), emb)
    h = up.attentions[-1](h, encoder_hidden_states=context, return_dict=False)[0]
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


# fashion-sd: skip features 0 conv_in, 1 down 0's layer, 2 its downsampler, 3 down 1's layer;
# up block 0 reads 3, 2 and up block 1 reads 1, 0. F_cache is the input of the up layer reading feature k.
F_CACHE_OF_BRANCH = {0: "up_blocks.1.attentions.0", 1: "up_blocks.0", 2: "up_blocks.0.attentions.0", 3: "mid_block"}


@pytest.mark.parametrize("branch", [0, 1, 2, 3])
@torch.inference_mode()
def test_shallow_step_matches_reference(pipe, branch):
    unet = pipe.unet
    (x0, context), (x1, _) = unet_inputs(unet, 0), unet_inputs(unet, 1)
    t0, t1 = torch.tensor(801), torch.tensor(701)
    deep_module = unet.get_submodule(F_CACHE_OF_BRANCH[branch])
    captured = []
    handle = deep_module.register_forward_hook(lambda m, i, o: captured.append(o))
    full0, full1 = unet(x0, t0, context).sample, unet(x1, t1, context).sample
    handle.remove()
    # the full UNet at x1 with F_cache swapped for its value at x0: what the shallow step must give
    handle = deep_module.register_forward_hook(lambda m, i, o: captured[0])
    expected = unet(x1, t1, context).sample
    handle.remove()
    if branch == 0:  # and, independently, by hand
        by_hand = shallow_reference(unet, x1, t1, context, captured[0][0])
        torch.testing.assert_close(by_hand, expected, rtol=1e-5, atol=1e-5)

    accel.patch(unet, deepcache=DeepCache(interval=2, branch=branch))
    modules = get_patch(unet, "deepcache").describe()["patched"]["modules"]
    assert "F_cache" in modules[F_CACHE_OF_BRANCH[branch]]
    torch.testing.assert_close(unet(x0, t0, context).sample, full0, rtol=0, atol=0)
    shallow = unet(x1, t1, context).sample
    torch.testing.assert_close(shallow, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shallow, full1, atol=1e-4)


def test_shallow_step_skips_all_but_the_branch():
    """SD-1.5's layout (meta tensors, no compute): branch 0 keeps only the last up layer."""
    from diffusers import UNet2DConditionModel

    from accel.patches.deepcache.unet import deep_units

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                                    norm_num_groups=8, attention_head_dim=2)
    units, branches = deep_units(unet, 0)
    assert branches == 12  # conv_in + 4 levels x 2 layers + 3 downsamplers
    assert [name for name, _ in units][-2:] == ["up_blocks.3.resnets.1", "up_blocks.3.attentions.1"]
    assert [name for name, _ in deep_units(unet, 11)[0]] == ["mid_block"]


@torch.inference_mode()
def test_bare_unet_reset(pipe):
    unet = pipe.unet
    x, context = unet_inputs(unet, 0)
    ts = [torch.tensor(t) for t in (901, 801, 701, 601)]
    accel.patch(unet, deepcache=2)
    deep = deep_counter(unet)
    first = [unet(x, t, context).sample for t in ts]
    assert deep.calls == 2 and get_patch(unet, "deepcache").last_call()["full_steps"] == [0, 2]
    unet(x, ts[0], context)  # continues the run: step 4 is full, step 5 would be shallow
    accel.deepcache.reset(unet)
    again = [unet(x, t, context).sample for t in ts]
    deep.handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    accel.patch(unet, deepcache=DeepCache(interval=2, schedule="non-uniform"))
    with pytest.raises(ValueError, match="num_steps"):
        unet(x, ts[0], context)
    accel.deepcache.reset(unet, num_steps=4)
    [unet(x, t, context) for t in ts]
    assert get_patch(unet, "deepcache").last_call()["full_steps"] == [0, 3]  # c=1 of 4, k=2: the two ends


# -- samplers that repeat timesteps or call the UNet twice per step ------------------------------
@pytest.mark.parametrize("name", ["PNDMScheduler", "HeunDiscreteScheduler"])
def test_repeating_samplers(pipe, name):
    import diffusers

    accel.patch(pipe, deepcache=3)
    # replaced after patching: the scheduler is hooked per call
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    deep = deep_counter(pipe.unet)
    latents = run(pipe, steps=6)
    deep.handle.remove()
    loop = len(pipe.scheduler.timesteps)  # PNDM's PRK warm-up repeats timesteps; Heun: 2 * 6 - 1
    assert loop > 6 and (name != "HeunDiscreteScheduler" or loop == 11)
    report = get_patch(pipe, "deepcache").last_call()
    # a step is one iteration of the denoising loop (one scheduler.step, one UNet evaluation)
    assert report["full_steps"] == list(range(0, loop, 3)) and report["steps"] == loop
    assert deep.calls == len(report["full_steps"]) and torch.isfinite(latents).all()
    assert not hasattr(pipe.scheduler, "_accel_hooks")  # the per-call hook is gone


# -- other pipelines ----------------------------------------------------------------------------
def images(channels=1, seed=0):
    return torch.rand(1, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_img2img_and_inpaint(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    for cls, extra in [(StableDiffusionImg2ImgPipeline, {"image": images(), "strength": 0.6}),
                       (StableDiffusionInpaintPipeline, {"image": images(), "mask_image": mask, "strength": 0.6})]:
        other = cls(**parts, requires_safety_checker=False)
        other.set_progress_bar_config(disable=True)
        reference = run(other, **extra)
        accel.patch(other, deepcache=3)
        deep = deep_counter(other.unet)
        latents = run(other, **extra)
        deep.handle.remove()
        report = get_patch(other, "deepcache").last_call()
        assert report["planned_steps"] == 6 and report["full_steps"] == [0, 3] and deep.calls == 2
        assert not torch.allclose(latents, reference)
        accel.unpatch(other)
        assert type(other) is cls and torch.equal(run(other, **extra), reference)


def make_controlnet(unet):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero convolutions start at zero: give them weights
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
    return controlnet.eval()


def test_controlnet_residuals_on_shallow_steps(pipe):
    from diffusers import StableDiffusionControlNetPipeline

    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    cn_pipe = StableDiffusionControlNetPipeline(**parts, controlnet=make_controlnet(pipe.unet),
                                                requires_safety_checker=False)
    cn_pipe.set_progress_bar_config(disable=True)
    control = images(channels=3, seed=1)
    reference = run(cn_pipe, image=control)
    accel.patch(cn_pipe, deepcache=3)
    patch_ = get_patch(cn_pipe, "deepcache")
    used = run(cn_pipe, image=control)
    assert patch_.last_call()["full_unet_calls"] == 4

    def zero_on_shallow(module, args, out):
        if patch_.state.full:
            return out
        down, mid = out
        return tuple(torch.zeros_like(r) for r in down), torch.zeros_like(mid)

    handle = cn_pipe.controlnet.register_forward_hook(zero_on_shallow)
    dropped = run(cn_pipe, image=control)
    handle.remove()
    assert not torch.allclose(used, dropped, atol=1e-5)  # shallow levels do use the ControlNet
    accel.unpatch(cn_pipe)
    assert torch.equal(run(cn_pipe, image=control), reference)


def make_sdxl(pipe):
    """A tiny SDXL pipeline: two seeded text towers (the second with projection) on the fashion-sd
    tokenizer, a UNet with SDXL's added text/time conditioning and a plain down block at level 0."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = dict(vocab_size=573, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    encoder, encoder_2 = CLIPTextModel(CLIPTextConfig(**text)), CLIPTextModelWithProjection(
        CLIPTextConfig(**text, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), cross_attention_dim=64, attention_head_dim=(2, 4),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    xl = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=encoder.eval(), text_encoder_2=encoder_2.eval(),
                                   tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer, unet=unet.eval(),
                                   scheduler=pipe.scheduler, force_zeros_for_empty_prompt=False)
    xl.set_progress_bar_config(disable=True)
    return xl


def test_sdxl_added_conditioning(pipe):
    xl = make_sdxl(pipe)
    reference = run(xl)
    accel.patch(xl, deepcache=1)
    assert torch.equal(run(xl), reference)
    accel.patch(xl, deepcache=DeepCache(interval=3, branch=3))  # the cross-attention level stays live
    deep = Counter(xl.unet.mid_block.resnets[0])
    latents = run(xl)
    deep.handle.remove()
    assert deep.calls == 4 and torch.isfinite(latents).all() and not torch.allclose(latents, reference)
    accel.unpatch(xl)
    assert torch.equal(run(xl), reference)


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, word", [(0, "interval"), (DeepCache(branch=4), "branch"),
                                         ({"schedule": "x"}, "schedule")])
def test_bad_values_leave_model_unpatched(pipe, value, word):
    cls = type(pipe)
    with pytest.raises(ValueError, match=word):
        accel.patch(pipe, deepcache=value)
    assert type(pipe) is cls and get_patch(pipe, "deepcache") is None
    assert not hasattr(pipe.unet, "_accel_hooks")


def test_unsupported_models():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from accel.pipelines.fashion_sd import build_vae

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    dit = DiTPipeline(transformer=transformer, vae=build_vae(), scheduler=DDIMScheduler())
    for obj in (dit, transformer, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="UNet2DConditionModel"):
            accel.patch(obj, deepcache=3)


@pytest.mark.parametrize("branch", [4, 7, 8, 10])
def test_cached_features_are_never_modified_by_their_consumers(branch):
    """FreeU scales half the channels of an up block's input in place; with the deep output cached,
    every shallow step on the same input must give the full step's output, with no drift."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(8, 8, 16, 16), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 3, 8, generator=g)
    with torch.inference_mode():
        full = unet(x, t, c).sample
        accel.patch(unet, deepcache=DeepCache(interval=10, branch=branch))
        outputs = [unet(x, t, c).sample for _ in range(4)]  # step 0 full, then three shallow steps
    assert get_patch(unet, "deepcache").last_call()["full_steps"] == [0]
    for out in outputs:
        assert torch.equal(out, full)
