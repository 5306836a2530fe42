"""A-ViT on timm ViTs: halting arithmetic against hand-computed numbers, both inference paths
against a slow per-image reference that runs timm's own blocks on each image's active tokens,
the unpatched model, and the trained asset's recorded accuracy."""
import json
import math

import pytest
import torch

import accel
from accel.api import get_patch
from accel.patches.avit import HaltingState, gaussian_prior, halting_distribution, kl_divergence, ponder_loss
from tests.conftest import build_variant as build, images, make_vit

torch.set_num_threads(1)

HALTING = dict(gamma=3.0, beta=1.0)  # on these random models: tokens halt after 2-4 blocks, differently per image




VARIANTS = ["vit", "deit_distilled", "registers_avgpool", "deit3_layerscale", "qknorm_postnorm"]


def reference_avit(model, x, gamma, beta, eps=0.01):
    """The paper's A-ViT, one image at a time: every block runs timm's own forward on the tokens of
    that image that have not halted; halting with Python floats. Returns logits, the output
    states [B, N, C] and the depth of every token."""
    feats = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    prefix, num_blocks = model.num_prefix_tokens, len(model.blocks)
    outputs, depths = [], []
    for b in range(x.shape[0]):
        t = feats[b].clone()
        n = t.shape[0]
        cumulative, depth, out = [0.0] * n, [0] * n, torch.zeros_like(t)
        active = list(range(n))
        for layer, blk in enumerate(model.blocks, start=1):
            y = blk(t[active][None])[0]
            still = []
            for j, k in enumerate(active):
                t[k] = y[j]
                if layer == num_blocks:
                    h = 1.0
                elif k < prefix:
                    h = 0.0
                else:
                    h = float(torch.sigmoid(gamma * y[j, 0] - beta))
                if cumulative[k] + h >= 1 - eps:
                    weight, depth[k] = 1.0 - cumulative[k], layer
                else:
                    weight = h
                    still.append(k)
                cumulative[k] += h
                out[k] += weight * y[j]
            active = still
        outputs.append(out)
        depths.append(depth)
    out = torch.stack(outputs)
    return model.forward_head(model.norm(out)), out, torch.tensor(depths)


def test_halting_arithmetic_against_hand_computed_example():
    # One image, 4 tokens (token 0 a prefix token), 4 blocks, eps = 0.01; the state is 1-d.
    scores = [[0.9, 0.3, 0.995, 0.1], [0.9, 0.5, 0.7, 0.2], [0.9, 0.4, 0.7, 0.3], [0.9, 0.9, 0.9, 0.9]]
    can_halt = torch.tensor([False, True, True, True])
    for removal in (False, True):
        state = HaltingState(1, 4, 4, 0.01, can_halt, 1, torch.device("cpu"), torch.float32, record=True)
        index = torch.arange(4)
        for layer, h in enumerate(scores, start=1):
            h, x = torch.tensor(h), torch.full((4, 1), float(layer))  # the state after block l is l
            if removal:  # only the tokens still active, as the removal path calls it
                halt = state.step(h[index], x[index], index)
                index = index[~halt]
            else:
                state.step(h, x)
        # token 1: 0.3 + 0.5 = 0.8, + 0.4 >= 0.99 at block 3: remainder 0.2, rho 3.2
        # token 2: 0.995 >= 0.99 at block 1: remainder 1, rho 2
        # token 3: 0.1 + 0.2 + 0.3 = 0.6, forced at block 4: remainder 0.4, rho 4.4
        # token 0 (prefix): never halts before the last block: remainder 1, depth 4
        assert state.depth.tolist() == [4, 3, 1, 4]
        torch.testing.assert_close(state.remainder, torch.tensor([1.0, 0.2, 1.0, 0.4]))
        torch.testing.assert_close(ponder_loss(state), torch.tensor((3.2 + 2.0 + 4.4) / 3))
        # output: sum_l p^l * l = 4; 0.3*1 + 0.5*2 + 0.2*3 = 1.9; 1; 0.1 + 0.4 + 0.9 + 1.6 = 3.0
        torch.testing.assert_close(state.output[:, 0], torch.tensor([4.0, 1.9, 1.0, 3.0]))
        assert not state.active.any()
        dist = halting_distribution(state)  # p per block averaged over tokens 1..3
        expected = torch.tensor([0.3 + 1.0 + 0.1, 0.5 + 0.2, 0.2 + 0.3, 0.4]) / 3
        torch.testing.assert_close(dist, expected)
        uniform = torch.full((4,), 0.25)
        kl = sum(p * math.log(p / 0.25) for p in expected.tolist())
        torch.testing.assert_close(kl_divergence(dist, uniform), torch.tensor(kl))
    g = [math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(-2.0)]
    torch.testing.assert_close(gaussian_prior(4, 2.0, 1.0), torch.tensor(g) / sum(g))
    x = torch.tensor([[[0.5, 9.0], [2.0, -1.0]]])
    expected = torch.tensor([[1 / (1 + math.exp(-(10 * 0.5 - 30))), 1 / (1 + math.exp(-(10 * 2.0 - 30)))]])
    torch.testing.assert_close(accel.avit.halting_score(x, 10.0, 30.0), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_paths_match_slow_reference(variant):
    model = build(variant)
    x = images(5)  # odd batch
    with torch.inference_mode():
        ref_logits, ref_out, ref_depth = reference_avit(model, x, **HALTING)
        results = {}
        for mode in ("mask", "remove"):
            accel.patch(model, avit=accel.AViT(**HALTING, mode=mode))
            logits = model(x)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model.forward_features(x), model.norm(ref_out), rtol=1e-4, atol=1e-5)
            depth = accel.avit.depth_map(model)
            results[mode] = logits
    prefix = model.num_prefix_tokens
    assert torch.equal(depth.flatten(1), ref_depth[:, prefix:])
    per_image = ref_depth[:, prefix:].sum(dim=1)
    assert len(set(per_image.tolist())) > 1  # images halted differently
    assert ref_depth[:, prefix:].min() < len(model.blocks)  # something halted early
    torch.testing.assert_close(results["remove"], results["mask"], rtol=1e-5, atol=1e-5)


def test_removal_really_computes_fewer_tokens():
    model = make_vit()
    x = images(3)
    seen = {"qkv": [], "mlp": []}
    handles = []
    for blk in model.blocks:
        handles.append(blk.attn.qkv.register_forward_pre_hook(lambda m, a: seen["qkv"].append(a[0].shape[:-1].numel())))
        handles.append(blk.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].shape[:-1].numel())))
    with torch.inference_mode():
        _, _, depth = reference_avit(model, x, **HALTING)
        seen["qkv"].clear(), seen["mlp"].clear()
        accel.patch(model, avit=accel.AViT(**HALTING))
        model(x)
    expected = [int((depth >= layer).sum()) for layer in range(1, 5)]  # tokens entering each block
    assert expected[-1] < expected[0] == 3 * 65
    assert seen["qkv"] == seen["mlp"] == expected
    last = get_patch(model, "avit").last_call()
    assert last["computed_tokens"] == last["active_tokens"] == expected
    assert last["mode"] == "remove"
    assert last["mean_depth"] == pytest.approx(depth[:, 1:].float().mean().item())
    with torch.inference_mode():
        accel.patch(model, avit=accel.AViT(**HALTING, mode="mask"))
        seen["mlp"].clear()
        model(x)
    assert seen["mlp"] == [3 * 65] * 4  # the masked path computes every token
    assert get_patch(model, "avit").last_call()["active_tokens"] == expected
    for h in handles:
        h.remove()


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_equals_unpatched_and_unpatch_is_bit_exact(variant):
    model = build(variant)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    x = images(3)
    with torch.inference_mode():
        ref = model(x)
        accel.patch(model, avit=accel.AViT(beta=math.inf))  # scores exactly 0: nothing halts
        assert torch.equal(model(x), ref)
        accel.patch(model, avit=accel.AViT(**HALTING))
        assert not torch.allclose(model(x), ref)
        accel.unpatch(model)
        assert torch.equal(model(x), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def test_halting_that_never_triggers_runs_the_same_blocks():
    """A finite beta so large that every score is 0 in float32 goes through our block loop and
    still gives the unpatched outputs (both paths)."""
    model = make_vit()
    x = images(2)
    with torch.inference_mode():
        ref = model(x)
        for mode in ("mask", "remove"):
            accel.patch(model, avit=accel.AViT(beta=1e4, mode=mode))
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
            assert get_patch(model, "avit").last_call()["mean_depth"] == 4.0


def test_bf16_and_grad_mode_eval():
    model = make_vit()
    x = images(3)
    with torch.inference_mode():
        accel.patch(model, avit=accel.AViT(**HALTING))
        ref = model(x)
    out = model(x)  # removal path with autograd on
    torch.testing.assert_close(out, ref)
    model = model.to(torch.bfloat16)
    with torch.inference_mode():
        low = model(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.nn.functional.cosine_similarity(low.float(), ref, dim=-1).min() > 0.98


def test_bad_input_errors_leave_model_untouched():
    model = make_vit()
    x = images(1)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    with torch.inference_mode():
        ref = model(x)
    cases = [
        (dict(gamma="10"), TypeError, "gamma"), (dict(gamma=-1.0), ValueError, "gamma"),
        (dict(beta=math.nan), ValueError, "beta"), (dict(eps=1.0), ValueError, "eps"),
        (dict(eps=True), TypeError, "eps"), (dict(mode="drop"), ValueError, "mode"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            accel.AViT(**kwargs)
        with pytest.raises(error, match=name):
            accel.patch(model, avit=kwargs)
    with pytest.raises(TypeError, match="AViT"):
        accel.patch(model, avit=0.5)
    with pytest.raises(ValueError, match="unknown setting"):
        accel.patch(model, avit={"threshold": 0.9})
    with pytest.raises(FileNotFoundError, match="halting file"):
        accel.patch(model, avit="/nonexistent/halting.safetensors")
    with pytest.raises(TypeError, match="supported"):
        accel.patch(torch.nn.Linear(3, 3), avit=accel.AViT())
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    with torch.inference_mode():
        assert torch.equal(model(x), ref)
        accel.patch(model, avit=accel.AViT(**HALTING))
        with pytest.raises(ValueError, match="attn_mask"):
            model(x, attn_mask=torch.zeros(65, 65))
        with pytest.raises(NotImplementedError, match="forward_intermediates"):
            model.forward_intermediates(x)


def test_state_dict_keys_unchanged_and_save_load_round_trip(tmp_path):
    model = make_vit()
    keys = list(model.state_dict())
    config = accel.AViT(gamma=2.5, beta=0.75, eps=0.05, mode="mask")
    accel.patch(model, avit=config)
    assert list(model.state_dict()) == keys
    path = accel.avit.save(tmp_path / "halting.safetensors", config, metadata={"note": "test"})
    assert accel.avit.load(path) == config
    assert accel.avit.load(path, mode="remove") == accel.AViT(gamma=2.5, beta=0.75, eps=0.05)
    assert accel.avit.metadata(path)["note"] == "test"
    assert set(config.state_dict()) == {"gamma", "beta", "eps"}
    inf = accel.avit.save(tmp_path / "identity.safetensors", accel.AViT(beta=math.inf))
    assert accel.avit.load(inf).never_halts
    (tmp_path / "other.safetensors").write_bytes(b"not a halting file")
    with pytest.raises(ValueError, match="not a halting file"):
        accel.avit.load(tmp_path / "other.safetensors")
    x = images(2)
    with torch.inference_mode():
        expected = model(x)
        fresh = accel.patch(make_vit(seed=3), avit=str(path))  # the path shorthand
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), expected)


def test_finetune_lowers_ponder_loss_and_changes_weights():
    model = make_vit()
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batch = (images(8, seed=1), torch.randint(0, 10, (8,), generator=gen))
    result = accel.avit.finetune(model, [batch] * 6, steps=6, lr=3e-3, config=accel.AViT(**HALTING),
                                 ponder_weight=1.0, kl_weight=0.1, prior_mean=2.0, prior_std=1.0)
    history = result.history
    assert len(history) == 6 and result.config == accel.AViT(**HALTING)
    assert all(math.isfinite(v) for record in history for v in record.values())
    assert history[-1]["ponder"] < history[0]["ponder"]
    assert history[-1]["depth"] < history[0]["depth"]
    assert get_patch(model, "avit") is None and not model.training  # left as it was
    assert list(model.state_dict()) == keys
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="prior_mean"):
        accel.avit.finetune(model, [batch], steps=1, prior_mean=9.0)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        accel.avit.finetune(torch.nn.Linear(2, 2), [batch], steps=1)


def test_distillation_loss_against_a_hand_computed_kl():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    for t in (1.0, 2.0):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist()):
            ps = [math.exp(v / t) for v in s_row]
            pt = [math.exp(v / t) for v in t_row]
            ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
            expected += sum(b * math.log(b / a) for a, b in zip(ps, pt))
        expected *= t * t / len(student)
        got = accel.avit.distillation_loss(student, teacher, t)
        assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(accel.avit.distillation_loss(student, student)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher_logits"):
        accel.avit.distillation_loss(student, teacher[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        accel.avit.distillation_loss(student, teacher, 0.0)


def test_finetune_with_a_teacher_adds_the_distillation_term():
    model, teacher = make_vit(), make_vit(seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    batch = (images(8, seed=1), torch.randint(0, 10, (8,), generator=gen))
    result = accel.avit.finetune(model, [batch] * 2, steps=2, lr=1e-3, config=accel.AViT(**HALTING),
                                 teacher=teacher, distill_weight=0.5, temperature=2.0)
    first = result.history[0]
    assert first["distill"] > 0
    # the first step's loss is the sum of its parts, the distillation term included
    assert first["loss"] == pytest.approx(first["task"] + 5e-4 * first["ponder"] + 0.1 * first["kl"]
                                          + 0.5 * first["distill"], rel=1e-5)
    with pytest.raises(ValueError, match="frozen copy"):
        accel.avit.finetune(model, [batch], steps=1, teacher=model)
    with pytest.raises(TypeError, match="teacher"):
        accel.avit.finetune(model, [batch], steps=1, teacher="deit")
    with pytest.raises(ValueError, match="temperature"):
        accel.avit.finetune(model, [batch], steps=1, teacher=teacher, temperature=-1.0)


def test_training_loss_needs_the_masked_path():
    model = accel.patch(make_vit(), avit=accel.AViT(**HALTING))  # removal path in eval mode
    x, y = images(2), torch.tensor([1, 2])
    prior = gaussian_prior(4, 2.0, 1.0)
    with pytest.raises(ValueError, match="mask"):
        accel.avit.training_loss(model, model(x), y, prior=prior, ponder_weight=1.0, kl_weight=1.0)
    model.train()
    loss, parts = accel.avit.training_loss(model, model(x), y, prior=prior, ponder_weight=1.0, kl_weight=1.0)
    loss.backward()
    assert math.isclose(float(loss.detach()), float(parts["task"] + parts["ponder"] + parts["kl"]), rel_tol=1e-5)
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_trained_asset_gives_recorded_accuracy():
    from accel.pipelines import load, load_test_subset
    from accel.pipelines.fashion_avit import FASHION_AVIT_DIR
    from accel.pipelines.fashion_vit import preprocess

    recorded = json.loads((FASHION_AVIT_DIR / "config.json").read_text())["metrics"]
    model, config = load("fashion-vit-avit")
    assert isinstance(config, accel.AViT) and not config.never_halts
    n = recorded["subset_slice"]["images"]
    images_, labels = load_test_subset()
    x, y = preprocess(images_[:n]), labels[:n]
    accel.patch(model, avit=config)
    with torch.inference_mode():
        logits = model(x)  # one batch, as the script measured it
        depth = accel.avit.depth_map(model).float().mean().item()
        accel.patch(model, avit=accel.AViT(config.gamma, config.beta, config.eps, mode="mask"))
        masked = model(x[:64])
    accuracy = (logits.argmax(-1) == y).float().mean().item()
    assert abs(accuracy - recorded["subset_slice"]["accuracy"]) <= 2 / n  # thread-count float noise
    assert depth == pytest.approx(recorded["subset_slice"]["mean_depth"], abs=0.02)
    assert recorded["mean_depth"] < 12
    assert torch.equal(masked.argmax(-1), logits[:64].argmax(-1))
