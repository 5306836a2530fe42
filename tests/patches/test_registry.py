"""The method registry, the shared settings path, and a pipeline with its parts as one patched object."""
import dataclasses
import importlib
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import accel
from accel.patches import registry
from accel.patches.base import MethodPatch
from accel.patches.settings import Settings
from tests.conftest import images, make_vit


# -- a method added by a test, with no edit anywhere else -------------------------------------------
@dataclasses.dataclass(frozen=True)
class Offset(Settings):
    shift: float = 1.0

    METHOD = "offset"
    EXPECTED = "a float shift or a dict of settings"

    @classmethod
    def from_shorthand(cls, value):
        return {"shift": value} if isinstance(value, float) else None


class OffsetLinear(MethodPatch):
    """Adds ``shift`` to the output of an ``nn.Linear``."""

    SUPPORTED = "torch.nn.Linear"

    @classmethod
    def matches(cls, obj):
        return isinstance(obj, nn.Linear)

    def _install(self):
        self.hooks.add(self.target, lambda m, call_next, x: call_next(x) + self.config.shift)
        self.patched_modules["forward"] = f"+{self.config.shift}"


@pytest.fixture
def offset_method():
    method = accel.register(accel.Method("offset", Offset, (OffsetLinear,)))
    yield method
    accel.unregister("offset")


def test_a_registered_method_is_patchable_described_and_removable(offset_method):
    assert "offset" in accel.available_methods()
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    ref = layer(x)
    accel.patch(layer, offset=0.5)
    torch.testing.assert_close(layer(x), ref + 0.5)
    info = accel.describe(layer)["methods"]["offset"]
    assert info["settings"] == {"shift": 0.5} and info["patched"]["modules"] == {"forward": "+0.5"}
    with pytest.raises(TypeError, match="offset: torch.nn.modules.conv.Conv1d is not supported; supported: "
                                        "torch.nn.Linear"):
        accel.patch(nn.Conv1d(1, 1, 1), offset=0.5)
    with pytest.raises(ValueError, match="offset: unknown settings scale; allowed: shift"):
        accel.patch(layer, offset={"scale": 2.0})
    accel.unpatch(layer, "offset")
    assert torch.equal(layer(x), ref) and "_accel_hooks" not in vars(layer) and "_accel_patches" not in vars(layer)


def test_unregistered_methods_are_unknown_and_names_are_checked(offset_method):
    accel.unregister("offset")
    assert "offset" not in accel.available_methods()
    with pytest.raises(ValueError, match="unknown method 'offset'"):
        accel.patch(nn.Linear(2, 2), offset=0.5)
    accel.register(offset_method)  # the fixture unregisters it again
    with pytest.raises(ValueError, match="registered already"):
        accel.register(offset_method)
    with pytest.raises(ValueError, match="identifier"):
        accel.register(dataclasses.replace(offset_method, name="an offset"))
    with pytest.raises(TypeError, match="MethodPatch subclasses"):
        accel.register(dataclasses.replace(offset_method, name="other", adapters=(nn.Linear,)))
    with pytest.raises(ValueError, match="no method 'nothing'"):
        accel.unregister("nothing")


def test_every_built_in_method_is_registered_and_reachable_from_the_top():
    names = [m.name for m in registry.methods()]
    assert names[:7] == ["tome", "deepcache", "avit", "evit", "early_exit", "token_exit", "region_cache"]
    for method in registry.methods()[:7]:
        assert getattr(accel, method.name).__name__ == method.package  # accel.tome is the package
        assert importlib.import_module(f"accel.{method.name}") is getattr(accel, method.name)  # from accel.tome import
        assert getattr(accel, method.config.__name__) is method.config  # accel.ToMe is the config
        assert getattr(accel, method.name).METHOD is method
    deciders = {m.name for m in registry.methods() if m.decides_tokens}
    assert deciders == {"tome", "avit", "evit", "early_exit", "token_exit", "region_cache"}


# -- one settings path for every method -------------------------------------------------------------
@pytest.mark.parametrize("method", registry.methods(), ids=lambda m: m.name)
def test_uniform_config_errors(method):
    with pytest.raises(ValueError, match=f"^{method.name}: unknown settings not_a_setting; allowed: "):
        method.coerce({"not_a_setting": 1})
    with pytest.raises(TypeError, match=f"^{method.name}: expected accel.{method.config.__name__}\\(...\\), .*not a bool"):
        method.coerce(True)
    with pytest.raises(TypeError, match=f"^{method.name}: expected accel.{method.config.__name__}\\(...\\), "
                                        ".*; got object$"):
        method.coerce(object())


def test_numpy_scalars_are_the_numbers_they_hold():
    assert accel.ToMe.coerce(np.int64(8)) == accel.ToMe(r=8) and type(accel.ToMe.coerce(np.int64(8)).r) is int
    assert accel.ToMe.coerce(np.float32(0.5)) == accel.ToMe(ratio=0.5)
    assert accel.EViT.coerce(np.float64(0.7)) == accel.EViT(keep_rate=0.7)
    assert accel.DeepCache.coerce(np.int32(3)) == accel.DeepCache(interval=3)
    assert accel.TokenExit.coerce(np.float32(0.25)) == accel.TokenExit(threshold=0.25)
    assert accel.RegionCache.coerce(np.float64(0.5)).ratio == 0.5
    assert accel.ToMe(r=[np.int64(1), 2]).r == [1, 2]
    assert accel.ToMe(r=4, prop_attn=np.False_).prop_attn is False
    with pytest.raises(TypeError, match="not a bool"):
        accel.ToMe.coerce(np.True_)
    vit = make_vit()
    x = images(2)
    with torch.inference_mode():
        expected = accel.patch(make_vit(), tome=8)(x)
        assert torch.equal(accel.patch(vit, tome=np.int64(8))(x), expected)


def test_a_tuple_is_always_r_inflect_and_a_list_always_per_block():
    assert accel.ToMe.coerce((8, 1)) == accel.ToMe(r=8, inflect=1.0)
    assert accel.ToMe.coerce((8, 0.5)).per_block_r(4) == [12, 9, 7, 4]
    assert accel.ToMe.coerce([8, 1, 0, 2]).per_block_r(4) == [8, 1, 0, 2]
    with pytest.raises(ValueError, match=r"a tuple r is \(r, inflect\).*give a per-block schedule as a list"):
        accel.ToMe.coerce((8, 1, 0, 2))
    with pytest.raises(ValueError, match=r"a tuple r is \(r, inflect\)"):
        accel.ToMe(r=(8, "a"))
    # a config round-trips through dataclasses.replace, per-block schedules included
    per_block = accel.ToMe(r=[1, 2, 3, 4])
    assert dataclasses.replace(per_block, prop_attn=False).r == [1, 2, 3, 4]


# -- exclusivity, on one model and across a pipeline and its parts ----------------------------------
VIT_DECIDERS = {"tome": 2, "avit": {}, "evit": 0.7, "token_exit": 0.1,
                "early_exit": lambda: accel.early_exit.ExitHeads(blocks=[1], dim=48, num_classes=10, thresholds=[0.9])}


@pytest.mark.parametrize("first, second", list(itertools.permutations(VIT_DECIDERS, 2)))
def test_token_deciding_methods_refuse_each_other_in_every_order(first, second):
    def value(name):
        return VIT_DECIDERS[name]() if callable(VIT_DECIDERS[name]) else VIT_DECIDERS[name]

    vit = make_vit()
    accel.patch(vit, **{first: value(first)})
    with pytest.raises(ValueError, match=f"each decide which tokens .*already patched: {first}\\)"):
        accel.patch(vit, **{second: value(second)})
    assert list(accel.describe(vit)["methods"]) == [first]


@pytest.fixture(scope="module")
def dit_pipe():
    from accel.pipelines import load

    return load("fashion-dit")


@pytest.mark.parametrize("first, second", [("tome", "region_cache"), ("region_cache", "tome")])
@pytest.mark.parametrize("order", ["part then pipeline", "pipeline then part"])
def test_exclusivity_sees_a_pipeline_and_its_denoiser_as_one(dit_pipe, first, second, order):
    values = {"tome": 0.5, "region_cache": 0.5}
    objects = (dit_pipe.transformer, dit_pipe) if order == "part then pipeline" else (dit_pipe, dit_pipe.transformer)
    try:
        accel.patch(objects[0], **{first: values[first]})
        with pytest.raises(ValueError, match=f"{', '.join(sorted((first, second)))} each decide which tokens"):
            accel.patch(objects[1], **{second: values[second]})
        assert list(accel.describe(dit_pipe)["methods"]) == [first]
        assert list(accel.describe(dit_pipe.transformer)["methods"]) == [first]
    finally:
        accel.unpatch(dit_pipe)
    assert "_accel_patches" not in vars(dit_pipe) and "_accel_patches" not in vars(dit_pipe.transformer)
    assert not any("_accel_hooks" in vars(m) for m in dit_pipe.transformer.modules())


@pytest.fixture(scope="module")
def sd_pipe():
    from accel.pipelines import load

    return load("fashion-sd")


def hooks_on(module):
    return sum(len(chain.hooks) for m in module.modules() for chain in vars(m).get("_accel_hooks", {}).values())


def draw(pipe, steps=4):
    with torch.inference_mode():
        return pipe(["a photo of a bag"], num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images


def test_deepcache_on_a_part_then_on_the_pipeline_replaces_it_and_back(sd_pipe):
    pipe = sd_pipe
    cls = type(pipe)
    ref = draw(pipe)
    expected = draw(accel.patch(pipe, deepcache=2))
    one_patch_hooks = hooks_on(pipe.unet)
    accel.unpatch(pipe)
    try:
        accel.patch(pipe.unet, deepcache=3)  # bare UNet ...
        info = accel.describe(pipe)["methods"]["deepcache"]  # ... seen from the pipeline
        assert info["on"] == "unet" and info["settings"]["interval"] == 3
        accel.patch(pipe, deepcache=2)  # replaces the UNet's patch: one set of hooks, not two
        assert hooks_on(pipe.unet) == one_patch_hooks
        assert torch.equal(draw(pipe), expected)
        assert accel.describe(pipe.unet)["methods"]["deepcache"]["settings"]["interval"] == 2
        accel.patch(pipe.unet, deepcache=3)  # and the other way round
        assert type(pipe) is cls and "_accel_patches" not in vars(pipe)
        assert accel.describe(pipe)["methods"]["deepcache"]["on"] == "unet"
        with accel.patched(pipe, deepcache=2):  # a scoped replacement puts the part's patch back after
            assert torch.equal(draw(pipe), expected)
        assert accel.describe(pipe)["methods"]["deepcache"]["settings"]["interval"] == 3
        accel.unpatch(pipe)  # the pipeline's unpatch covers its parts
        assert hooks_on(pipe.unet) == 0 and "_accel_patches" not in vars(pipe.unet)
        assert torch.equal(draw(pipe), ref)
    finally:
        accel.unpatch(pipe)
