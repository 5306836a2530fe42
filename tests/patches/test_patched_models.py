"""A patched model behaves like a model: deep copies are independent patched models, pickles load
back patched, and gradient checkpointing recomputes each block with that block's own state."""
import copy
import io

import pytest
import torch

import accel
from accel.patches.registry import get_patch
from tests.conftest import images, make_vit
from tests.patches.test_avit import HALTING
from tests.patches.test_early_exit import make_heads, separating_thresholds
from tests.patches.test_token_exit import median_first_update

VIT_METHODS = ["tome", "evit", "token_exit", "avit", "early_exit"]


def vit_setting(method, x):
    """A setting of ``method`` that really changes the computation of ``make_vit()`` on ``x``."""
    model = make_vit().requires_grad_(False)
    if method == "token_exit":
        return accel.TokenExit(threshold=median_first_update(model, x))
    if method == "avit":
        return accel.AViT(**HALTING)
    if method == "early_exit":
        heads = make_heads()
        return accel.EarlyExit(heads, thresholds=separating_thresholds(model, heads, x, "max_prob"))
    return {"tome": 4, "evit": 0.5}[method]


def perturb(module, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def hooked(module):
    return [name for name, m in module.named_modules() if "_accel_hooks" in vars(m)]


@pytest.mark.parametrize("method", VIT_METHODS)
def test_deepcopy_is_an_independent_patched_model(method):
    x = images(6)
    setting = vit_setting(method, x)
    model = accel.patch(make_vit(), **{method: setting})
    twin = copy.deepcopy(model)
    with torch.inference_mode():
        out = model(x)
        report = accel.describe(model)["methods"][method]["last_call"]
        assert torch.equal(twin(x), out)
        assert get_patch(twin, method).target is twin and get_patch(twin, method).state is not get_patch(model, method).state
        perturb(twin)  # an EMA or teacher copy gets its own weights ...
        moved = twin(x[:3])
        assert torch.equal(model(x), out)  # ... which the original never runs
        assert accel.describe(model)["methods"][method]["last_call"] == report  # nor shares per-call state
        expected = accel.patch(_perturbed(), **{method: setting})(x[:3])
        assert torch.equal(moved, expected)
        accel.unpatch(twin)  # the copy is unpatched on its own ...
        assert torch.equal(twin(x), _perturbed()(x)) and hooked(twin) == []
        assert "_accel_patches" not in vars(twin) and accel.describe(twin)["methods"] == {}
        assert torch.equal(model(x), out) and list(accel.describe(model)["methods"]) == [method]
        accel.unpatch(model)  # ... and so is the original
        assert torch.equal(model(x), make_vit()(x))


def _perturbed():
    model = make_vit()
    perturb(model)
    return model


@pytest.mark.parametrize("method", VIT_METHODS)
def test_pickled_model_loads_back_patched(method):
    x = images(6)
    setting = vit_setting(method, x)
    model = accel.patch(make_vit(), **{method: setting})
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
        assert accel.describe(loaded)["methods"][method]["settings"] == accel.describe(model)["methods"][method]["settings"]
        accel.unpatch(loaded)
        assert torch.equal(loaded(x), make_vit()(x)) and hooked(loaded) == []
        assert list(accel.describe(model)["methods"]) == [method]
    assert list(loaded.state_dict()) == list(make_vit().state_dict())


@pytest.mark.parametrize("method", ["tome", "evit", "token_exit", "early_exit"])
def test_gradient_checkpointing_recomputes_each_block_with_its_own_state(method):
    x = images(6)
    setting = vit_setting(method, x)
    plain = accel.patch(make_vit(), **{method: setting})
    checkpointed = accel.patch(make_vit(), **{method: setting})
    checkpointed.set_grad_checkpointing(True)
    losses = []
    for model in (plain, checkpointed):
        loss = model(x).square().sum()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = {name: p.grad for name, p in plain.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, param in checkpointed.named_parameters():
        if grads[name] is None:
            assert param.grad is None
        else:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # the report is the forward pass's, not the recomputation's
    assert accel.describe(checkpointed)["methods"][method]["last_call"] == \
        accel.describe(plain)["methods"][method]["last_call"]


def test_avit_refuses_gradient_checkpointing_clearly():
    model = accel.patch(make_vit(), avit=accel.AViT(**HALTING))
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r"avit: gradient checkpointing .*set_grad_checkpointing\(False\)"):
        model(images(2))
    model.set_grad_checkpointing(False)
    model(images(2)).sum().backward()  # and trains once it is off


# -- pipelines ---------------------------------------------------------------------------------------
PIPELINES = {
    "fashion-sd": {"tome": 0.5, "deepcache": 2},
    "fashion-dit": {"region_cache": accel.RegionCache(ratio=0.5, warmup=2, refresh=0)},
}


def draw(pipe, steps=4):
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if type(pipe).__name__ == "DiTPipeline":
            return pipe(class_labels=[1, 7], num_inference_steps=steps, generator=generator, output_type="pt").images
        return pipe(["a photo of a bag", "a sneaker"], num_inference_steps=steps, output_type="pt",
                    generator=generator).images


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", list(PIPELINES))
def test_copied_and_pickled_pipelines_are_independent_patched_pipelines(name):
    from accel.pipelines import load

    pipe = load(name)
    cls = type(pipe)
    ref = draw(pipe)
    accel.patch(pipe, **PIPELINES[name])
    out = draw(pipe)
    assert not torch.equal(out, ref)
    twin = copy.deepcopy(pipe)
    assert torch.equal(draw(twin), out)
    perturb(denoiser(twin))
    moved = draw(twin)
    assert torch.equal(draw(pipe), out)  # the original's UNet/transformer is not the copy's
    fresh = load(name)
    perturb(denoiser(fresh))
    fresh_ref = draw(fresh)
    assert torch.equal(moved, draw(accel.patch(fresh, **PIPELINES[name])))

    buffer = io.BytesIO()
    torch.save(twin, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(accel.describe(loaded)["methods"]) == list(PIPELINES[name]) and torch.equal(draw(loaded), moved)

    accel.unpatch(pipe)  # the copies stay patched
    assert torch.equal(draw(pipe), ref) and torch.equal(draw(twin), moved)
    for other in (twin, loaded):
        accel.unpatch(other)
        assert type(other) is cls and hooked(denoiser(other)) == [] and torch.equal(draw(other), fresh_ref)
