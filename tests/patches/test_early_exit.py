"""Early exit per image on timm ViTs: against a slow per-image loop, hand-computed confidences,
a calibration case with a known answer, the unpatched model, and the shipped heads' figures."""
import json
import math
from pathlib import Path

import pytest
import torch

import accel
from accel.api import get_patch
from accel.early_exit import EarlyExit, ExitHeads
from accel.patches.early_exit.timm import backbone_exits
from tests.conftest import images, make_vit

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "assets" / "fashion-vit-exits"


def make_heads(blocks=(0, 1, 2), dim=48, pool="token", seed=3, scale=6.0, **kwargs):
    """Random heads whose logits are spread enough that confidences differ across images."""
    torch.manual_seed(seed)
    heads = ExitHeads(list(blocks), dim=dim, num_classes=10, pool=pool, **kwargs)
    with torch.no_grad():
        for head in heads.heads:
            head.fc.weight.mul_(scale)
    return heads.eval()


def hand_confidence(z, criterion):
    p = [math.exp(v) for v in z.tolist()]
    s = sum(p)
    p = [v / s for v in p]
    if criterion == "max_prob":
        return max(p)
    return -sum(v * math.log(v) for v in p if v > 0)


def reference(model, heads, x, thresholds, criterion):
    """Each image alone through the blocks; after each exit block its head decides (by hand)."""
    outs, depths = [], []
    exits = {b: k for k, b in enumerate(heads.blocks)}
    for b in range(x.shape[0]):
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x[b:b + 1]))))
        out = None
        for i, blk in enumerate(model.blocks):
            t = blk(t)
            if i in exits:
                k = exits[i]
                pooled = t[0, 0] if heads.pool == "token" else t[0, model.num_prefix_tokens:].mean(0)
                z = heads.heads[k](pooled[None])[0]
                conf = hand_confidence(z, criterion)
                if (conf >= thresholds[k]) if criterion == "max_prob" else (conf <= thresholds[k]):
                    out, depth = z, i + 1
                    break
        if out is None:
            out, depth = model.forward_head(model.norm(t))[0], len(model.blocks)
        outs.append(out)
        depths.append(depth)
    return torch.stack(outs), torch.tensor(depths)


def separating_thresholds(model, heads, x, criterion, quantiles=(0.7, 0.6, 0.5)):
    """Per-exit thresholds half-way between two images' confidences (never on one), so a float
    rounding difference between batched and per-image computation cannot flip a decision."""
    with torch.no_grad():
        pooled, _ = backbone_exits(model, x, heads)
        out = []
        for k, q in enumerate(quantiles):
            conf = accel.early_exit.confidence(heads.heads[k](pooled[k]), criterion).sort().values
            j = min(int(q * len(conf)), len(conf) - 2)
            if criterion == "entropy":
                j = len(conf) - 2 - j
            out.append(float(conf[j] + conf[j + 1]) / 2)
    return out


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
@pytest.mark.parametrize("pool,model_kwargs", [("token", {}), ("avg", {"global_pool": "avg"})])
def test_exit_decisions_and_logits_match_per_image_loop(criterion, pool, model_kwargs):
    model = make_vit(**model_kwargs)
    heads = make_heads(pool=pool)
    x = images(13, seed=5)
    thresholds = separating_thresholds(model, heads, x, criterion)
    with torch.inference_mode():
        expected, depths = reference(model, heads, x, thresholds, criterion)
        accel.patch(model, early_exit=EarlyExit(heads, thresholds=thresholds, criterion=criterion))
        out = model(x)
    assert set(depths.tolist()) == {1, 2, 3, 4}  # a mixed batch: some leave at every exit, some stay
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(accel.early_exit.exit_depths(model), depths)
    last = get_patch(model, "early_exit").last_call()
    counts = [int((depths == d).sum()) for d in (1, 2, 3, 4)]
    assert last["exited"] == counts[:3] and last["final"] == counts[3]
    assert last["images_per_block"] == [13, 13 - counts[0], 13 - counts[0] - counts[1], counts[3]]
    assert last["mean_depth"] == pytest.approx(depths.float().mean().item())


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_small_and_odd_batches_match_per_image_loop(batch):
    model = make_vit()
    heads = make_heads()
    thresholds = separating_thresholds(model, heads, images(9, seed=2), "max_prob")
    x = images(batch, seed=2)
    with torch.inference_mode():
        expected, depths = reference(model, heads, x, thresholds, "max_prob")
        accel.patch(model, early_exit=EarlyExit(heads, thresholds=thresholds))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(accel.early_exit.exit_depths(model), depths)


def test_confidence_functions_against_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])) + 7.0
    mp = accel.early_exit.confidence(logits, "max_prob")
    ent = accel.early_exit.confidence(logits, "entropy")
    torch.testing.assert_close(mp, torch.tensor([0.5, 0.9, 1 / 3]))
    torch.testing.assert_close(ent, torch.tensor([1.5 * math.log(2), -0.9 * math.log(0.9) - 0.1 * math.log(0.05),
                                                  math.log(3)]))
    assert accel.early_exit.exit_mask(logits, 0.45, "max_prob").tolist() == [True, True, False]
    assert accel.early_exit.exit_mask(logits, 1.0, "entropy").tolist() == [False, True, False]  # 1.5 ln2 = 1.04
    assert not accel.early_exit.exit_mask(logits, accel.early_exit.NEVER["max_prob"], "max_prob").any()
    assert not accel.early_exit.exit_mask(logits, accel.early_exit.NEVER["entropy"], "entropy").any()
    conf = torch.tensor([[0.2, 0.95, 0.6], [0.1, 0.99, 0.85]])  # 2 exits, 3 images
    assert accel.early_exit.first_exit(conf, torch.tensor([0.9, 0.8])).tolist() == [2, 0, 1]
    bf16 = accel.early_exit.confidence(logits.bfloat16(), "max_prob")
    assert bf16.dtype == torch.float32


def synthetic(n, seed, classes=4):
    """Two exits and a final head with a known structure: at exit 0 an image is right exactly when
    its confidence is >= 0.8, at exit 1 when >= 0.6; the final head is always right."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    final = torch.nn.functional.one_hot(labels, classes).float() * 10

    def exit_logits(cut):
        conf = torch.rand(n, generator=gen) * 0.7 + 0.3  # max prob in [0.3, 1)
        pred = torch.where(conf >= cut, labels, (labels + 1) % classes)
        rest = (1 - conf) / (classes - 1)
        probs = rest[:, None].expand(n, classes).clone()
        probs[torch.arange(n), pred] = conf
        return probs.log(), conf

    (z0, c0), (z1, c1) = exit_logits(0.8), exit_logits(0.6)
    return torch.stack([z0, z1]), final, labels, torch.stack([c0, c1])


def drop_by_hand(exit_logits, final, labels, thresholds):
    correct_final = correct = 0
    for i in range(labels.shape[0]):
        pred = final[i].argmax()
        for k in range(exit_logits.shape[0]):
            if exit_logits[k, i].softmax(-1).max() >= thresholds[k]:
                pred = exit_logits[k, i].argmax()
                break
        correct += int(pred == labels[i])
        correct_final += int(final[i].argmax() == labels[i])
    return (correct_final - correct) / labels.shape[0]


@pytest.mark.parametrize("max_drop", [0.0, 0.05])
def test_calibration_meets_target_on_held_out_data(max_drop):
    z, final, labels, _ = synthetic(2000, seed=0)
    cal = accel.early_exit.calibrate(z, final, labels, depths=[2, 4], final_depth=8, max_drop=max_drop)
    assert drop_by_hand(z, final, labels, cal.thresholds) <= max_drop + 1e-9
    assert cal.drop == pytest.approx(drop_by_hand(z, final, labels, cal.thresholds))
    if max_drop == 0.0:
        # the known answer: exit where every image is right (conf >= 0.8, then >= 0.6), up to the grid
        assert 0.79 <= cal.thresholds[0] <= 0.81 and 0.59 <= cal.thresholds[1] <= 0.61
    else:
        assert cal.thresholds[0] < 0.79  # the budget is spent, earliest exit first
    held_z, held_final, held_labels, _ = synthetic(2000, seed=1)  # held-out draw, same distribution
    assert drop_by_hand(held_z, held_final, held_labels, cal.thresholds) <= max_drop + 0.015
    assert sum(cal.exit_fraction) == pytest.approx(1.0)
    assert cal.mean_depth < 5.0  # about 70% leave early: 0.29 at depth 2, 0.41 at depth 4


def test_calibration_without_labels_bounds_disagreement_and_entropy():
    z, final, labels, _ = synthetic(1000, seed=2)
    cal = accel.early_exit.calibrate(z, final, None, depths=[2, 4], final_depth=8, max_drop=0.02,
                                     criterion="entropy")
    conf = accel.early_exit.confidence(z.reshape(-1, 4), "entropy").reshape(2, -1)
    first = accel.early_exit.first_exit(conf, torch.tensor(cal.thresholds), "entropy")
    preds = torch.cat([z.argmax(-1), final.argmax(-1)[None]]).gather(0, first[None])[0]
    assert (preds != final.argmax(-1)).float().mean() <= 0.02 + 1e-9
    assert cal.accuracy is None and first.lt(2).float().mean() > 0.5


def test_never_thresholds_equal_unpatched_model_and_unpatch_is_bit_exact():
    model = make_vit()
    heads = make_heads()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    x = images(5)
    with torch.inference_mode():
        ref = model(x)
        for criterion in ("max_prob", "entropy"):
            accel.patch(model, early_exit=EarlyExit.never(heads, criterion))
            assert torch.equal(model(x), ref)
            assert accel.early_exit.exit_depths(model).tolist() == [4] * 5
        accel.patch(model, early_exit=EarlyExit(heads, thresholds=0.0))  # everyone leaves at block 0
        assert not torch.equal(model(x), ref)
        assert get_patch(model, "early_exit").last_call()["images_per_block"] == [5]
        accel.unpatch(model)
        assert torch.equal(model(x), ref)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def test_exited_images_skip_the_remaining_blocks():
    model = make_vit()
    heads = make_heads()
    x = images(9, seed=5)
    thresholds = separating_thresholds(model, heads, x, "max_prob")
    seen = {i: [] for i in range(4)}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, args, out, i=i: seen[i].append(args[0].shape[0]))
    with torch.inference_mode():
        _, depths = reference(model, heads, x, thresholds, "max_prob")
        for v in seen.values():
            v.clear()
        accel.patch(model, early_exit=EarlyExit(heads, thresholds=thresholds))
        model(x)
    assert [seen[i] for i in range(4)] == [[int((depths > i).sum())] for i in range(4)]


def test_state_dict_keys_unchanged_and_forward_features_passes_through():
    model = make_vit()
    keys = list(model.state_dict())
    x = images(3)
    with torch.inference_mode():
        feats = model.forward_features(x)
        accel.patch(model, early_exit=EarlyExit(make_heads(), thresholds=0.0))
        assert list(model.state_dict()) == keys
        assert torch.equal(model.forward_features(x), feats)  # not hooked: full depth


def test_save_load_round_trip_and_folder_shorthand(tmp_path):
    model = make_vit()
    heads = make_heads(hidden=16, thresholds=[0.3, 0.25, 0.2], criterion="max_prob", metrics={"note": 1})
    folder = accel.early_exit.save_heads(tmp_path / "exits", heads)
    assert json.loads((folder / "exit_heads.json").read_text())["blocks"] == [0, 1, 2]
    loaded = accel.early_exit.load_heads(folder)
    assert loaded.settings() == heads.settings()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), heads.state_dict().values()))
    x = images(6)
    with torch.inference_mode():
        accel.patch(model, early_exit=heads)
        expected = model(x)
        accel.patch(model, early_exit=str(folder))
        assert torch.equal(model(x), expected)
        assert get_patch(model, "early_exit").config.thresholds == (0.3, 0.25, 0.2)
    assert accel.describe(model)["methods"]["early_exit"]["settings"]["heads"]["blocks"] == [0, 1, 2]


def test_low_precision_and_heads_stay_with_the_user():
    model = make_vit().to(torch.bfloat16)
    heads = make_heads()
    x = images(4).bfloat16()
    with torch.inference_mode():
        ref = model(x)
        accel.patch(model, early_exit=EarlyExit.never(heads))
        assert torch.equal(model(x), ref)
        accel.patch(model, early_exit=EarlyExit(heads, thresholds=[0.3, 0.2, 0.1]))
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert next(heads.parameters()).dtype == torch.float32  # a converted copy served the bf16 model


def test_training_mode_passes_through():
    model = make_vit().train()
    x = images(3)
    ref = model(x)
    accel.patch(model, early_exit=EarlyExit(make_heads(), thresholds=0.0))
    assert torch.equal(model(x), ref)
    assert get_patch(model, "early_exit").last_call() is None


def test_bad_input_errors_leave_the_model_untouched(tmp_path):
    model = make_vit()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    heads = make_heads()
    with pytest.raises(ValueError, match="criterion"):
        EarlyExit(heads, thresholds=0.5, criterion="margin")
    with pytest.raises(ValueError, match="thresholds needs 3"):
        EarlyExit(heads, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        EarlyExit(heads, thresholds=float("nan"))
    with pytest.raises(ValueError, match="calibrate"):
        EarlyExit(heads)  # no thresholds given and none calibrated
    with pytest.raises(TypeError, match="heads"):
        EarlyExit(heads=torch.nn.Linear(2, 2), thresholds=0.5)
    with pytest.raises(TypeError, match="early_exit"):
        accel.patch(model, early_exit=0.9)
    with pytest.raises(FileNotFoundError, match="exit_heads.json"):
        accel.patch(model, early_exit=str(tmp_path))
    with pytest.raises(ValueError, match="width 32"):
        accel.patch(model, early_exit=EarlyExit(make_heads(dim=32), thresholds=0.5))
    with pytest.raises(ValueError, match="exit blocks must be below 3"):
        accel.patch(model, early_exit=EarlyExit(make_heads(blocks=(1, 3)), thresholds=0.5))
    with pytest.raises(ValueError, match="prefix tokens"):
        accel.patch(model, early_exit=EarlyExit(make_heads(pool="avg", num_prefix_tokens=2), thresholds=0.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        ExitHeads([2, 1], dim=48, num_classes=10)
    with pytest.raises(TypeError, match="not supported"):
        accel.patch(torch.nn.Linear(2, 2), early_exit=EarlyExit(heads, thresholds=0.5))
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    accel.patch(model, early_exit=EarlyExit(heads, thresholds=0.5))
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(1), attn_mask=torch.zeros(65, 65))


def distill_loss(model, heads, x, temperature):
    """The distillation loss written out: per exit, T^2 KL(teacher_T || exit_T), summed."""
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        pooled = []
        for i, blk in enumerate(model.blocks):
            t = blk(t)
            if i in heads.blocks:
                pooled.append(t[:, 0])
        teacher = (model.forward_head(model.norm(t)) / temperature).softmax(-1)
        total = 0.0
        for k, head in enumerate(heads.heads):
            student = (head(pooled[k]) / temperature).log_softmax(-1)
            total += (teacher * (teacher.log() - student)).sum(-1).mean() * temperature ** 2
    return float(total)


def test_fit_heads_reduces_the_loss_and_leaves_the_backbone_unchanged():
    model = make_vit()
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(64, seed=11)
    torch.manual_seed(0)
    untrained = ExitHeads([0, 2], dim=48, num_classes=10)
    start = distill_loss(model, untrained, x, 2.0)
    heads = accel.early_exit.fit_heads(model, x, heads=untrained, epochs=40, lr=5e-3, temperature=2.0,
                                       batch_size=16)
    assert distill_loss(model, heads, x, 2.0) < 0.5 * start
    assert all(torch.equal(v, backbone[k]) for k, v in model.state_dict().items())
    assert not model.training and not heads.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="labels"):
        accel.early_exit.fit_heads(model, x, [0], label_weight=1.0, epochs=1)


def test_shipped_heads_load_and_their_recorded_accuracy_holds():
    from accel.pipelines import load, load_test_subset
    from accel.pipelines.fashion_vit import preprocess

    heads = accel.early_exit.load_heads(SHIPPED)
    recorded = heads.metrics["test_subset_slice"]
    model = load("fashion-vit")
    x, y = load_test_subset()
    x, y = x[::recorded["step"]], y[::recorded["step"]]

    with torch.inference_mode():
        accel.patch(model, early_exit=SHIPPED)
        logits = model(preprocess(x))
    acc = (logits.argmax(-1) == y).float().mean().item()
    depth = accel.early_exit.exit_depths(model).float().mean().item()
    assert abs(acc - recorded["accuracy"]) <= 2 / len(y)  # a borderline image may flip with the batch size
    assert abs(depth - recorded["mean_depth"]) <= 0.05
    assert recorded["accuracy"] >= recorded["unpatched_accuracy"] - 0.02
    assert depth < 0.7 * len(model.blocks)


def test_torch_compile_with_dynamic_shapes_matches_eager():
    model = make_vit()
    heads = make_heads()
    x = images(13, seed=5)
    thresholds = separating_thresholds(model, heads, x, "max_prob")
    accel.patch(model, early_exit=EarlyExit(heads, thresholds=thresholds))
    with torch.inference_mode():
        eager, eager_odd = model(x), model(x[:7])
        compiled = torch.compile(model, dynamic=True)  # the batch shrinks by a data-dependent amount
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x[:7]), eager_odd, rtol=1e-5, atol=1e-5)
    assert accel.early_exit.exit_depths(model).shape == (7,)
