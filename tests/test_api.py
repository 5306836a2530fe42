"""The patch API: dispatch, errors, atomicity, replacement, composition, the context manager."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import accel
from accel.patches.base import MethodPatch
from tests.conftest import images, make_vit


def snapshot(model):
    """Everything a patch could leave behind: instance attributes of every module, and weights."""
    return {name: set(vars(m)) for name, m in model.named_modules()}, copy.deepcopy(model.state_dict())


def assert_untouched(model, snap, x, ref):
    attrs, state = snap
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs
    assert "_accel_patches" not in vars(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    with torch.inference_mode():
        assert torch.equal(model(x), ref)


@pytest.fixture
def setup():
    model = make_vit()
    x = images(2)
    with torch.inference_mode():
        ref = model(x)
    return model, x, ref, snapshot(model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tome=-1), ValueError, "r must be >= 0"),
        (dict(tome=[1, 2]), ValueError, "needs 4 entries"),
        (dict(tome=[1, -2, 3, 4]), ValueError, "non-negative ints"),
        (dict(tome="16"), TypeError, "expected accel.ToMe"),
        (dict(tome=True), TypeError, "not a bool"),
        (dict(tome=0.5), ValueError, "need r"),
        (dict(tome=dict(r=4, inflect=2.0)), ValueError, r"inflect must be in \[-1, 1\]"),
        (dict(tome=dict(r=4, prop_attn="yes")), TypeError, "prop_attn must be a bool"),
        (dict(tomee=4), ValueError, f"unknown method 'tomee'; available: {', '.join(sorted(accel.available_methods()))}"),
        (dict(), ValueError, "name at least one method"),
    ],
)
def test_bad_input_raises_and_leaves_model_untouched(setup, kwargs, error, match):
    model, x, ref, snap = setup
    with pytest.raises(error, match=match):
        accel.patch(model, **kwargs)
    assert_untouched(model, snap, x, ref)


@pytest.mark.parametrize("obj", [nn.Linear(4, 4), object(), "a string"])
def test_unsupported_objects_get_type_error_naming_what_is_supported(obj):
    with pytest.raises(TypeError, match="not supported; supported: timm VisionTransformer"):
        accel.patch(obj, tome=4)


def test_compiled_module_is_refused(vit):
    with pytest.raises(TypeError, match="patch the model first, then torch.compile"):
        accel.patch(torch.compile(vit), tome=4)


def test_failure_half_way_rolls_back(setup, monkeypatch):
    model, x, ref, snap = setup
    from accel.patches.tome.timm import ToMeTimm

    original = ToMeTimm._install

    def failing_install(self):
        original(self)  # every hook is in place ...
        raise RuntimeError("boom")  # ... and then something goes wrong

    monkeypatch.setattr(ToMeTimm, "_install", failing_install)
    with pytest.raises(RuntimeError, match="boom"):
        accel.patch(model, tome=4)
    assert_untouched(model, snap, x, ref)


@dataclasses.dataclass(frozen=True)
class Scale:
    factor: float
    fail: bool = False


class ScaleLogits(MethodPatch):
    """A stand-in second method: multiplies the model output, optionally failing to install."""

    SUPPORTED = "modules"

    @classmethod
    def matches(cls, obj):
        return isinstance(obj, nn.Module)

    def _install(self):
        factor, fail = self.config.factor, self.config.fail
        self.hooks.add(self.target, lambda m, call_next, *a, **k: call_next(*a, **k) * factor)
        self.patched_modules[""] = f"x{factor}"
        if fail:
            raise RuntimeError("second method failed")


@pytest.fixture
def scale_method():
    method = accel.register(accel.Method("scale", Scale, (ScaleLogits,)))
    yield method
    accel.unregister("scale")


def test_methods_compose_and_unpatch_one_at_a_time(setup, scale_method):
    model, x, ref, snap = setup
    with torch.inference_mode():
        tome_only = accel.patch(copy.deepcopy(model), tome=5)(x)
        accel.patch(model, tome=5, scale=Scale(2.0))
        assert list(accel.describe(model)["methods"]) == ["tome", "scale"]
        torch.testing.assert_close(model(x), 2.0 * tome_only)
        accel.unpatch(model, "tome")
        torch.testing.assert_close(model(x), 2.0 * ref)
        accel.unpatch(model, "scale")
    assert_untouched(model, snap, x, ref)


def test_failure_of_a_later_method_restores_replaced_settings(setup, scale_method):
    model, x, _, _ = setup
    accel.patch(model, tome=3)
    with torch.inference_mode():
        with_r3 = model(x)
        with pytest.raises(RuntimeError, match="second method failed"):
            accel.patch(model, tome=7, scale=Scale(2.0, fail=True))
        assert torch.equal(model(x), with_r3)
    assert accel.describe(model)["methods"]["tome"]["settings"]["r"] == 3
    assert list(accel.describe(model)["methods"]) == ["tome"]


def test_patching_twice_replaces_settings(setup):
    model, x, ref, snap = setup
    with torch.inference_mode():
        expected = accel.patch(copy.deepcopy(model), tome=7)(x)
        accel.patch(model, tome=2)
        accel.patch(model, tome=7)
        assert torch.equal(model(x), expected)
    assert accel.describe(model)["methods"]["tome"]["settings"]["r"] == 7
    assert all(len(vars(blk)["_accel_hooks"]["forward"].hooks) == 1 for blk in model.blocks)
    accel.unpatch(model)
    assert_untouched(model, snap, x, ref)


def test_patched_context_restores_previous_state(setup):
    model, x, ref, snap = setup
    with torch.inference_mode():
        with accel.patched(model, tome=6) as same:
            assert same is model and not torch.equal(model(x), ref)
        assert_untouched(model, snap, x, ref)
        accel.patch(model, tome=2)
        with_r2 = model(x)
        with accel.patched(model, tome=9):
            assert accel.describe(model)["methods"]["tome"]["settings"]["r"] == 9
        assert torch.equal(model(x), with_r2)
        assert accel.describe(model)["methods"]["tome"]["settings"]["r"] == 2
        accel.unpatch(model)
        with accel.patched(model, tome=4):
            accel.unpatch(model, "tome")  # undone inside the block: nothing left to undo on exit
        assert_untouched(model, snap, x, ref)


def test_unpatch_errors_and_idempotence(setup):
    model, x, ref, snap = setup
    assert accel.unpatch(model) is model  # nothing patched: nothing to do
    with pytest.raises(ValueError, match="tome is not patched"):
        accel.unpatch(model, "tome")
    with pytest.raises(ValueError, match="unknown method 'tomme'"):
        accel.unpatch(model, "tomme")
    with pytest.raises(ValueError, match="deepcache is not patched"):
        accel.unpatch(model, "deepcache")
    assert_untouched(model, snap, x, ref)


def test_describe_reports_settings_modules_and_last_call(vit):
    assert accel.describe(vit) == {"object": "timm.VisionTransformer", "methods": {}}
    accel.patch(vit, tome=accel.ToMe(r=4))
    info = accel.describe(vit)["methods"]["tome"]
    assert {k: info["settings"][k] for k in ("r", "ratio", "inflect", "prop_attn", "trace_source")} == \
        {"r": 4, "ratio": None, "inflect": 0.0, "prop_attn": True, "trace_source": False}
    assert info["settings"]["mode"] == "merge"  # the diffusion settings are there at their defaults
    assert info["patched"]["count"] == 5  # 4 blocks + size-weighted pooling
    assert info["patched"]["modules"]["blocks.0"] == "merge r=4"
    assert info["last_call"] is None  # not called yet
    with torch.inference_mode():
        vit(images(1))
    assert accel.describe(vit)["methods"]["tome"]["last_call"]["merged"] == [4, 4, 4, 4]
    str(accel.describe(vit))  # printable


def test_from_accel_tome_import():
    from accel.tome import ToMe, bipartite_soft_matching  # noqa: F401

    assert accel.tome.ToMe is accel.ToMe


def test_methods_that_each_own_the_vit_token_set_do_not_compose():
    vit = make_vit()
    accel.patch(vit, tome=2)
    with pytest.raises(ValueError, match=r"evit, tome each decide which tokens .*already patched: tome\)"):
        accel.patch(vit, evit=0.7)
    assert list(accel.describe(vit)["methods"]) == ["tome"]
    accel.unpatch(vit)
    with pytest.raises(ValueError, match=r"avit, tome each decide"):
        accel.patch(vit, tome=2, avit={})
    assert accel.describe(vit)["methods"] == {}
