"""Shared helpers: small timm ViTs with seeded random weights (no network, no checkpoint)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run on the CPU in Triton's interpreter (tests/kernels/). Triton decides when
# triton.language is first imported, which torch or a library may do long before a kernel test
# runs, so the setting is made here, before anything is imported. It changes nothing else: the
# kernels' dispatcher still gives CPU tensors the torch reference unless a test asks for Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)  # 64 patches


def make_vit(name: str = "vit_tiny_patch16_224", seed: int = 0, **overrides):
    """A timm model from the registry at a small size, seeded, in eval mode."""
    import timm

    torch.manual_seed(seed)
    kwargs = dict(SMALL, num_classes=10)
    kwargs.update(overrides)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def randomize_layer_scale(model, seed: int = 1) -> None:
    """LayerScale starts near 1e-5 (DeiT-3), which would hide whether it is applied."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def build_variant(variant: str):
    """Every timm ViT variant the token methods must serve, at a small size, seeded, in eval mode."""
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    if variant == "vit":
        return make_vit()
    if variant == "deit_distilled":
        return make_vit("deit_tiny_distilled_patch16_224")
    if variant == "deit3_layerscale":
        model = make_vit("deit3_small_patch16_224")
        randomize_layer_scale(model)
        return model
    if variant == "registers_avgpool":
        return make_vit("vit_base_patch16_reg4_gap_256")
    if variant == "dinov2_registers":
        model = make_vit("vit_base_patch14_reg4_dinov2")
        randomize_layer_scale(model)
        return model
    if variant == "qknorm_postnorm":
        torch.manual_seed(0)
        return VisionTransformer(**SMALL, num_classes=10, qk_norm=True, scale_attn_norm=True,
                                 block_fn=ResPostBlock, init_values=0.7).eval()
    if variant == "dynamic_img_size":
        return make_vit(dynamic_img_size=True)
    raise KeyError(variant)


def fused_and_patched(model, order: str, **methods):
    """``model`` with diffusers' ``fuse_qkv_projections()`` and ``accel.patch(**methods)`` applied in
    ``order`` ("fuse, then patch" or "patch, then fuse")."""
    import accel

    if order == "fuse, then patch":
        model.fuse_qkv_projections()
        return accel.patch(model, **methods)
    accel.patch(model, **methods)
    model.fuse_qkv_projections()
    return model


def images(batch: int = 2, size=(32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models: on a small shared machine two contending
    threads are slower, and one thread is deterministic. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A fresh cache folder with the built-in language model converted into it, once per test run
    (so CI runs the conversion every time): ``(folder, seconds the conversion took)``."""
    import time

    from accel.pipelines import load

    folder = tmp_path_factory.mktemp("accel-cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ACCEL_CACHE", str(folder))
        start = time.perf_counter()
        load("smollm2-135m")
        return folder, time.perf_counter() - start


@pytest.fixture(scope="session")
def load_built_in_lm(smollm2_cache):
    """``accel.pipelines.load`` for the language models (the target, its draft, its EAGLE head), run
    with this test run's cache of the converted target."""
    from accel.pipelines import load

    def loaded(name):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("ACCEL_CACHE", str(smollm2_cache[0]))
            return load(name)
    return loaded
