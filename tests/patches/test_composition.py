"""ToMe and DeepCache together on one pipeline (the trained fashion-sd): identity settings equal
the unpatched pipeline, the pair does what each does, and unpatch is bit-exact."""
import pytest
import torch

import accel
from accel.api import get_patch


@pytest.fixture(scope="module")
def pipe():
    import accel.pipelines

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield accel.pipelines.load("fashion-sd")
    torch.set_num_threads(threads)


def run(pipe, steps=6):
    with torch.inference_mode():
        return pipe(["a photo of a bag", "a photo of a sneaker"], num_inference_steps=steps, guidance_scale=3.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_tome_and_deepcache_compose_and_unpatch_exactly(pipe):
    reference = run(pipe)
    accel.patch(pipe, tome=0.0, deepcache=1)  # identity settings of both
    assert torch.equal(run(pipe), reference)

    accel.patch(pipe, deepcache=3)
    cached = run(pipe)
    accel.unpatch(pipe, "deepcache")
    accel.patch(pipe, tome=0.5)
    merged = run(pipe)
    accel.patch(pipe, deepcache=3)  # now both
    both = run(pipe)
    info = accel.describe(pipe)["methods"]
    assert set(info) == {"tome", "deepcache"}
    assert info["deepcache"]["last_call"]["full_steps"] == [0, 3]
    assert info["tome"]["last_call"] is not None
    for single in (cached, merged):
        assert not torch.equal(both, single)
    assert torch.nn.functional.cosine_similarity(both.flatten(), reference.flatten(), dim=0) > 0.95

    accel.unpatch(pipe)
    assert get_patch(pipe, "tome") is None and get_patch(pipe, "deepcache") is None
    assert torch.equal(run(pipe), reference)
    assert not any(hasattr(m, "_accel_hooks") for m in pipe.unet.modules())


def test_a_bad_second_method_leaves_the_pipeline_untouched(pipe):
    cls = type(pipe)
    with pytest.raises(ValueError, match="branch"):
        accel.patch(pipe, tome=0.5, deepcache=accel.DeepCache(branch=99))
    assert type(pipe) is cls and get_patch(pipe, "tome") is None
    assert not any(hasattr(m, "_accel_hooks") for m in pipe.unet.modules())


def add_lora(unet, seed=1):
    """A LoRA adapter on every attention projection, with non-zero seeded weights (peft)."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="test")


def test_lora_loaded_before_or_after_patching_gives_the_same_images(pipe):
    import copy

    before, after = copy.deepcopy(pipe), copy.deepcopy(pipe)
    plain = run(before)
    add_lora(before.unet)
    with_lora = run(before)
    assert not torch.allclose(with_lora, plain, atol=1e-4)  # the adapter changes the images
    # fixed destinations: with use_rand, ToMe's own generator advances with every call
    tome = accel.ToMe(ratio=0.5, use_rand=False)
    accel.patch(before, tome=tome, deepcache=3)
    accel.patch(after, tome=tome, deepcache=3)
    patched_plain = run(after)
    add_lora(after.unet)
    patched_lora = run(after)
    assert not torch.allclose(patched_lora, patched_plain, atol=1e-4)  # the patched path runs the adapter
    assert torch.equal(run(before), patched_lora)
    accel.unpatch(after)
    assert torch.equal(run(after), with_lora)  # unpatched, the LoRA model as it was


def test_tome_random_destinations_repeat_at_each_pipeline_call(pipe):
    accel.patch(pipe, tome=0.5)  # use_rand: destinations from ToMe's own generator, reseeded per call
    try:
        first, second = run(pipe), run(pipe)
    finally:
        accel.unpatch(pipe)
    assert torch.equal(first, second)


def test_tome_on_the_shipped_dit_pipeline_end_to_end():
    import accel.pipelines

    dit = accel.pipelines.load("fashion-dit")

    def images():
        with torch.inference_mode():
            return dit(class_labels=[7, 8, 9], num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images

    reference = images()
    accel.patch(dit, tome=0.0)
    assert torch.equal(images(), reference)
    for setting in (0.5, accel.ToMe(mode="downsample")):
        accel.patch(dit, tome=setting)
        out = images()
        assert not torch.equal(out, reference)
        assert (out - reference).abs().mean() < 0.1  # images in [0, 1]: close to the unpatched ones
        info = accel.describe(dit)["methods"]["tome"]
        assert info["patched"]["count"] >= 8  # every transformer block of the DiT (and the call hook)
    accel.unpatch(dit)
    assert torch.equal(images(), reference)


def test_pixart_pipeline_end_to_end():
    """A tiny PixArtAlphaPipeline (ada_norm_single blocks, a 1-layer T5 encoder, fashion-sd's
    tokenizer and autoencoder) run for 3 steps: identity, merging and unpatch."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from accel.pipelines.fashion_sd import build_vae, load_fashion_sd

    torch.manual_seed(0)
    tokenizer = load_fashion_sd().tokenizer
    encoder = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=12, d_kv=4, d_ff=24, num_layers=1,
                                      num_heads=2)).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=build_vae().eval(),
                               transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def draw():
        with torch.inference_mode():
            return pipe("a photo of a bag", num_inference_steps=3, guidance_scale=3.0, output_type="latent",
                        clean_caption=False, max_sequence_length=16, use_resolution_binning=False,
                        generator=torch.Generator().manual_seed(0)).images

    reference = draw()
    accel.patch(pipe, tome=0.0)
    assert torch.equal(draw(), reference)
    accel.patch(pipe, tome=0.5)
    merged = draw()
    assert merged.shape == reference.shape and not torch.equal(merged, reference)
    assert torch.nn.functional.cosine_similarity(merged.flatten(), reference.flatten(), dim=0) > 0.9
    assert accel.describe(pipe)["methods"]["tome"]["last_call"]["per_downsample"][1]["merged"] > 0
    accel.unpatch(pipe)
    assert torch.equal(draw(), reference)


def test_custom_attention_processors_run_under_both_patches(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Counting(AttnProcessor2_0):
        """The default processor, counting its calls and the query tokens it sees."""

        calls, sizes = 0, set()

        def __call__(self, attn, hidden_states, *args, **kwargs):
            Counting.calls += 1
            Counting.sizes.add(hidden_states.shape[1])
            return super().__call__(attn, hidden_states, *args, **kwargs)

    tome = accel.ToMe(ratio=0.5, use_rand=False)
    accel.patch(pipe, tome=tome, deepcache=3)
    try:
        before = run(pipe)
        processors = pipe.unet.attn_processors
        pipe.unet.set_attn_processor(Counting())
        after = run(pipe)
        pipe.unet.set_attn_processor(processors)
    finally:
        accel.unpatch(pipe)
    assert torch.equal(after, before)  # the same attention, now through the user's processor
    assert Counting.calls > 0
    # self-attention at 16x16 gets the 128 merged tokens (cross-attention there 256, the 8x8 level 64)
    assert Counting.sizes == {256, 128, 64}
