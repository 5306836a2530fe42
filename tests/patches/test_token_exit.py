"""Token exit on timm ViTs: against a slow per-image, token-by-token reference of the masked-update
formulation (stopped tokens keep their state and stay keys/values), the unpatched model, and
counts of the tokens that really enter each block's attention queries and MLP."""
import pytest
import torch

import accel
from accel.api import get_patch
from accel.token_exit import active_first, depth_map, relative_update
from tests.conftest import build_variant as build, images, make_vit

torch.set_num_threads(1)




VARIANTS = ["vit", "deit_distilled", "deit3_layerscale", "registers_avgpool", "qknorm_postnorm", "dynamic_img_size"]


def embed(model, x):
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def median_first_update(model, x):
    """A threshold that stops about half the patches after block 0 (random weights move tokens
    by a model-dependent amount)."""
    t = embed(model, x)
    return float(relative_update(model.blocks[0](t), t)[:, model.num_prefix_tokens:].median())


def reference(model, x, threshold, min_depth=1, halting=None):
    """Each image alone; every block computed on all tokens, then token by token: a stopped token
    keeps its state (it was only a key/value), an active one takes the block's output and stops
    when ||out - in|| / ||in|| < threshold, or (``halting=(gamma, beta, eps)``) when its sum of
    sigmoid(gamma * out[0] - beta) reaches 1 - eps. Returns logits, depths [B, N_patches] and
    the number of active tokens per block (summed over the batch)."""
    feats = embed(model, x)
    p, depth_total = model.num_prefix_tokens, len(model.blocks)
    logits, depths, counts = [], [], [0] * depth_total
    for b in range(x.shape[0]):
        t = feats[b]
        stopped = [False] * t.shape[0]
        depth = [depth_total] * (t.shape[0] - p)
        cumulative = [0.0] * t.shape[0]
        for i, blk in enumerate(model.blocks):
            full = blk(t[None])[0]
            new = t.clone()
            for j in range(t.shape[0]):
                if not stopped[j]:
                    new[j] = full[j]
                    counts[i] += 1
            if i + 1 < depth_total and halting is not None:
                gamma, beta, _ = halting
                for j in range(t.shape[0]):
                    if not stopped[j]:
                        cumulative[j] += float(torch.sigmoid(gamma * new[j, 0] - beta))
            if min_depth <= i + 1 < depth_total:
                for j in range(p, t.shape[0]):
                    halted = halting is not None and cumulative[j] >= 1 - halting[2]
                    small = float((new[j] - t[j]).norm() / t[j].norm()) < threshold
                    if not stopped[j] and (small or halted):
                        stopped[j] = True
                        depth[j - p] = i + 1
            t = new
        logits.append(model.forward_head(model.norm(t)[None])[0])
        depths.append(depth)
    return torch.stack(logits), torch.tensor(depths), counts


class CountTokens:
    """Counts the tokens entering each block's MLP and attention output projection (which sees
    exactly the query rows), with plain torch forward pre-hooks."""

    def __init__(self, model):
        self.mlp, self.queries, self.handles = [0] * len(model.blocks), [0] * len(model.blocks), []
        for i, blk in enumerate(model.blocks):
            self.handles.append(blk.mlp.register_forward_pre_hook(self._hook(self.mlp, i)))
            self.handles.append(blk.attn.proj.register_forward_pre_hook(self._hook(self.queries, i)))

    @staticmethod
    def _hook(counts, i):
        def hook(module, args):
            counts[i] += args[0].shape[:-1].numel()
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_model_matches_token_by_token_reference(variant):
    model = build(variant)
    size = (32, 48) if variant == "dynamic_img_size" else (32, 32)
    x = images(3, size=size)
    with torch.inference_mode():
        threshold = median_first_update(model, x)
        expected, depths, counts = reference(model, x, threshold)
        accel.patch(model, token_exit=threshold)
        counter = CountTokens(model)
        out = model(x)
        counter.remove()
        grid = depth_map(model)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert grid.shape == (3, size[0] // 4, size[1] // 4)
    assert torch.equal(grid.flatten(1), depths)
    assert len(depths.unique()) >= 2  # patches stopped at different depths
    # frozen tokens really are not recomputed: MLP and attention queries see only active ones
    assert counter.mlp == counts and counter.queries == counts
    assert get_patch(model, "token_exit").last_call()["active_tokens"] == counts
    assert sum(counts) < len(model.blocks) * 3 * (depths.shape[1] + model.num_prefix_tokens)


def test_min_depth_and_batch_items_stop_independently():
    model = make_vit()
    x = images(5, seed=4)
    with torch.inference_mode():
        threshold = median_first_update(model, x)
        expected, depths, counts = reference(model, x, threshold, min_depth=2)
        accel.patch(model, token_exit=accel.TokenExit(threshold=threshold, min_depth=2))
        out = model(x)
        grid = depth_map(model)
        alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone, out, rtol=1e-4, atol=1e-4)
    assert torch.equal(grid.flatten(1), depths) and int(grid.min()) == 2
    assert not all(torch.equal(depths[0], d) for d in depths[1:])  # images stop different tokens


def test_halting_score_criterion_matches_reference():
    model = make_vit()
    x = images(3)
    with torch.inference_mode():
        expected, depths, counts = reference(model, x, 0.0, halting=(2.0, -0.5, 0.01))
        accel.patch(model, token_exit=accel.TokenExit(threshold=0.0, halting=True, gamma=2.0, beta=-0.5))
        out = model(x)
        grid = depth_map(model)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(grid.flatten(1), depths) and len(depths.unique()) >= 2
    assert get_patch(model, "token_exit").last_call()["active_tokens"] == counts


def test_threshold_zero_equals_unpatched_and_unpatch_is_bit_exact():
    model = build("deit_distilled")
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    x = images(3)
    with torch.inference_mode():
        ref = model(x)
        accel.patch(model, token_exit=0.0)
        assert torch.equal(model(x), ref)
        assert int(depth_map(model).min()) == 4
        accel.patch(model, token_exit=0.05)
        assert not torch.allclose(model(x), ref, atol=1e-5)
        assert list(model.state_dict()) == keys
        accel.unpatch(model)
        assert torch.equal(model(x), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def test_odd_batch_of_one_and_bf16():
    model = make_vit()
    x = images(1)
    with torch.inference_mode():
        threshold = median_first_update(model, x)
        expected, depths, _ = reference(model, x, threshold)
        accel.patch(model, token_exit=threshold)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(depth_map(model).flatten(1), depths)
        model.to(torch.bfloat16)
        x16 = images(3).to(torch.bfloat16)
        out = model(x16)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert int(depth_map(model).min()) < 4  # tokens stopped in bf16 too
        accel.unpatch(model)
        ref16 = model(x16)
        with accel.patched(model, token_exit=0):
            assert torch.equal(model(x16), ref16)


def test_without_inference_mode_gradients_flow():
    model = make_vit()
    accel.patch(model, token_exit=0.034)
    model(images(2)).sum().backward()
    assert model.blocks[3].mlp.fc1.weight.grad is not None


def test_core_helpers_on_hand_computed_examples():
    x_in = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    x_out = torch.tensor([[[3.0, 4.5], [1.0, 0.0]]])
    torch.testing.assert_close(relative_update(x_out, x_in), torch.tensor([[0.1, 0.0]]))
    active = torch.tensor([[True, False, True, False], [False, False, False, True]])
    order, valid = active_first(active)
    assert order.tolist()[0] == [0, 2] and order.tolist()[1][0] == 3
    assert valid.tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("value, error, match", [
    (-0.1, ValueError, "threshold must be"),
    (float("inf"), ValueError, "threshold must be"),
    (True, TypeError, "not a bool"),
    ("0.05", TypeError, "float threshold"),
    (dict(threshold=0.05, min_depth=0), ValueError, "min_depth"),
    (dict(threshold=0.05, min_depth=2.0), TypeError, "min_depth"),
    (dict(threshold=0.05, min_depth=5), ValueError, "exceeds the model's 4 blocks"),
    (dict(threshold=0.05, halting=1), TypeError, "halting must be a bool"),
    (dict(threshold=0.05, eps=1.0), ValueError, "eps must be"),
    (dict(threshold=0.05, gamma=float("nan")), ValueError, "gamma must be"),
])
def test_bad_settings_get_clear_errors(value, error, match):
    model = make_vit()
    with pytest.raises(error, match=match):
        accel.patch(model, token_exit=value)
    assert get_patch(model, "token_exit") is None
    assert all("_accel_hooks" not in vars(m) for m in model.modules())


def test_depth_map_errors():
    model = make_vit()
    with pytest.raises(ValueError, match="not patched with token_exit"):
        depth_map(model)
    accel.patch(model, token_exit=0.05)
    with pytest.raises(RuntimeError, match="no call yet"):
        depth_map(model)
    with pytest.raises(TypeError, match="not supported"):
        accel.patch(torch.nn.Linear(2, 2), token_exit=0.05)
