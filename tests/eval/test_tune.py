"""``accel tune``: the candidates each adapter offers, and the fastest setting within a budget, chosen
from a measurement cache (the brute-force optimum over the cache is computed here to check it)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import accel
from accel.eval.evaluation import evaluate
from accel.eval.spec import UNPATCHED, parse_setting
from accel.eval.timing import Timing
from accel.eval.tuning import BUDGET_METRICS, Budget, NoSettingMeetsBudget, candidates, choose, tune
from accel.patches.base import MethodPatch
from accel.patches.evit.timm import EViTTimm
from accel.patches.registry import get_method
from accel.patches.settings import Settings
from tests.conftest import make_vit


@pytest.fixture(scope="module")
def tiny_vit():
    """A timm VisionTransformer: 32x32 images in 8x8 patches (16 patches), 2 blocks, 3 classes."""
    model = make_vit(patch_size=8, depth=2, num_classes=3)
    assert isinstance(model, VisionTransformer)
    return model


def tome_values(model) -> list:
    """ToMeTimm.tune_values' rule: r at 1/4, 1/2, 3/4 and all of patches/depth, at least 1, each once."""
    per_block = model.patch_embed.num_patches / len(model.blocks)
    return sorted({max(1, round(f * per_block)) for f in (0.25, 0.5, 0.75, 1.0)})


# -- a method that does not decide tokens, registered by the test, so pairs can form ---------------
@dataclasses.dataclass(frozen=True)
class Scale(Settings):
    factor: float = 1.0

    METHOD = "scale_logits"
    EXPECTED = "a float factor or a dict of settings"

    @classmethod
    def from_shorthand(cls, value):
        return {"factor": value} if isinstance(value, (int, float)) else None


class ScaleTimm(MethodPatch):
    SUPPORTED = "timm VisionTransformer"

    @classmethod
    def matches(cls, obj):
        return isinstance(obj, VisionTransformer)

    @classmethod
    def tune_values(cls, obj):
        return (1.0, 2.0)

    def _install(self):
        self.hooks.add(self.target, lambda m, call_next, x: call_next(x) * self.config.factor)
        self.patched_modules["forward"] = f"x{self.config.factor}"


@pytest.fixture
def scale_method():
    method = accel.register(accel.Method("scale_logits", Scale, (ScaleTimm,)))
    yield method
    accel.unregister("scale_logits")


# -- candidates -----------------------------------------------------------------------------------
def test_candidates_on_a_timm_vit(tiny_vit):
    labels = [s.label for s in candidates(tiny_vit)]
    tome = [f"tome={r}" for r in tome_values(tiny_vit)]
    evit = [f"evit={k}" for k in EViTTimm.tune_values(tiny_vit)]
    assert tome == ["tome=2", "tome=4", "tome=6", "tome=8"]  # 16 patches / 2 blocks = 8 per block
    assert evit and all(0 < k <= 1 for k in EViTTimm.tune_values(tiny_vit))
    # both decide which tokens a block computes, so they are never paired; the methods that need
    # something trained first (avit, early_exit, token_exit) offer nothing to search
    assert get_method("tome").decides_tokens and get_method("evit").decides_tokens
    assert labels == tome + evit
    assert not any("," in label for label in labels)


def test_candidate_settings_are_valid_patch_keywords(tiny_vit):
    for setting in candidates(tiny_vit):
        assert parse_setting(setting.label).methods == setting.methods
        assert len(setting.methods) == 1


def test_methods_that_may_compose_are_paired(tiny_vit, scale_method):
    assert not scale_method.decides_tokens
    labels = [s.label for s in candidates(tiny_vit)]
    tome, evit = tome_values(tiny_vit), EViTTimm.tune_values(tiny_vit)
    pairs = [label for label in labels if "," in label]
    expected = ([f"tome={r},scale_logits={f}" for r in tome for f in (1.0, 2.0)]
                + [f"evit={k},scale_logits={f}" for k in evit for f in (1.0, 2.0)])
    assert sorted(pairs) == sorted(expected)
    assert not any("tome" in label and "evit" in label for label in labels)
    pair = next(s for s in candidates(tiny_vit) if s.label == "tome=2,scale_logits=2.0")
    assert pair.methods == {"tome": 2, "scale_logits": 2.0}
    # and no pairs when asked not to compose
    single = [s.label for s in candidates(tiny_vit, compose=False)]
    assert single == [label for label in labels if "," not in label]


def test_methods_restricts(tiny_vit, scale_method):
    labels = [s.label for s in candidates(tiny_vit, methods=["tome"])]
    assert labels == [f"tome={r}" for r in tome_values(tiny_vit)]
    both = [s.label for s in candidates(tiny_vit, methods=["evit", "scale_logits"])]
    assert not any("tome" in label for label in both)
    assert "evit=0.5,scale_logits=1.0" in both


@pytest.mark.parametrize("name", ["avit", "deepcache", "no_such_method"])
def test_untunable_method_names_methods_option(tiny_vit, name):
    with pytest.raises(ValueError, match="--methods") as caught:
        candidates(tiny_vit, methods=["tome", name])
    message = str(caught.value)
    assert f"--methods: {name} cannot be tuned" in message and message.endswith("tunable here: tome")


def test_nothing_tunable():
    with pytest.raises(ValueError, match="no method can be tuned on Linear"):
        candidates(torch.nn.Linear(2, 2))


# -- budgets --------------------------------------------------------------------------------------
def test_budget_unknown_metric():
    with pytest.raises(ValueError, match="metric must be one of") as caught:
        Budget("fid", 10.0)
    for metric in BUDGET_METRICS:
        assert metric in str(caught.value)


def test_accuracy_drop_is_an_upper_bound():
    budget = Budget("accuracy_drop", 1.0)
    assert not budget.higher_is_better
    assert budget.met({"accuracy_drop": 0.5}) and budget.met({"accuracy_drop": 1.0})
    assert budget.met({"accuracy_drop": -2.0})  # a patched model that happens to do better
    assert not budget.met({"accuracy_drop": 1.5})
    assert not budget.met({"accuracy_drop": None}) and not budget.met({})
    assert "<= 1" in str(budget)


def test_quality_metrics_are_lower_bounds():
    budget = Budget("psnr", 30.0)
    assert budget.met({"psnr": 30.0}) and budget.met({"psnr": 45.0})
    assert not budget.met({"psnr": 29.9}) and not budget.met({"psnr": None})
    assert ">= 30" in str(budget)


def test_choose_with_an_accuracy_drop_budget():
    rows = [{"settings": UNPATCHED, "speedup": 1.0, "accuracy_drop": 0.0},
            {"settings": "fast", "speedup": 3.0, "accuracy_drop": 4.0},
            {"settings": "mild", "speedup": 1.4, "accuracy_drop": 0.2},
            {"settings": "middle", "speedup": 2.1, "accuracy_drop": 0.9}]
    assert choose(rows, Budget("accuracy_drop", 1.0))["settings"] == "middle"
    assert choose(rows, Budget("accuracy_drop", 0.5))["settings"] == "mild"
    assert choose(rows, Budget("accuracy_drop", 5.0))["settings"] == "fast"
    with pytest.raises(NoSettingMeetsBudget, match="the best was mild at 0.2"):
        choose(rows, Budget("accuracy_drop", 0.1))


# -- tune over a measured table -------------------------------------------------------------------
# label -> (speedup, PSNR); the fastest (tome=8) misses a 30 dB budget, evit=0.9 meets it but is slower
# than the unpatched model, and tome=2,deepcache=3 sits exactly on the bound.
TABLE = {
    UNPATCHED: (1.0, None),
    "tome=2": (1.3, 38.0),
    "tome=4": (1.8, 33.0),
    "tome=8": (2.6, 27.0),
    "evit=0.9": (0.9, 45.0),
    "evit=0.7": (1.5, 31.0),
    "tome=2,deepcache=3": (2.0, 30.0),
}
BUDGET = Budget("psnr", 30.0)


def table_settings(labels=None):
    return [parse_setting(label) for label in (labels or [k for k in TABLE if k != UNPATCHED])]


class FakeMeasure:
    """``measure(settings, part)`` as ``evaluate`` would answer it: a row per setting plus the unpatched
    one, from ``TABLE`` (calibration) or ``held_out`` (held-out: {label: PSNR})."""

    def __init__(self, held_out=None):
        self.calls = []
        self.held_out = held_out or {}

    def __call__(self, settings, part):
        self.calls.append((part, [s.label for s in settings]))
        rows = []
        for label in [UNPATCHED] + [s.label for s in settings if s.label != UNPATCHED]:
            speedup, psnr = TABLE[label]
            if part == "held-out" and label in self.held_out:
                psnr = self.held_out[label]
            rows.append({"settings": label, "speedup": speedup, "psnr": psnr})
        return rows

    def count(self, part):
        return sum(1 for p, _ in self.calls if p == part)


def brute_force(cache, budget):
    """The fastest cached row that meets ``budget`` and beats the unpatched model."""
    rows = list(json.loads(cache.read_text())["calibration"].values())
    fitting = [r for r in rows if budget.met(r) and r["speedup"] > 1]
    return max(fitting, key=lambda r: r["speedup"])["settings"]


def test_tune_picks_the_fastest_within_budget(tmp_path):
    cache, measure, said = tmp_path / "cache" / "tune.json", FakeMeasure(), []
    result = tune(None, BUDGET, measure, context={"model": "table"}, cache=cache, settings=table_settings(),
                  log=said.append)
    assert cache.is_file()
    stored = json.loads(cache.read_text())
    assert sorted(r["settings"] for r in stored["calibration"].values()) == sorted(TABLE)  # the baseline too
    assert [r["settings"] for r in stored["held-out"].values()] == [result["label"]]
    assert result["label"] == brute_force(cache, BUDGET) == "tome=2,deepcache=3"
    assert result["settings"] == {"tome": 2, "deepcache": 3}
    assert result["label"] != UNPATCHED
    fastest = max(TABLE, key=lambda k: TABLE[k][0])
    assert not BUDGET.met({"psnr": TABLE[fastest][1]}) and result["label"] != fastest
    assert result["chosen"]["speedup"] == 2.0
    assert result["budget"] == str(BUDGET) and result["metric"] == "psnr"
    assert result["measured"] == len(TABLE) - 1
    assert measure.count("calibration") == 1 and measure.calls[0][1] == [s.label for s in table_settings()]
    assert {r["settings"]: r["within_budget"] for r in result["rows"]} == {
        k: v[1] is not None and v[1] >= 30 for k, v in TABLE.items() if k != UNPATCHED}
    assert result["label"] in result["front"] and "tome=8" in result["front"] and "evit=0.9" in result["front"]
    assert said == ["tune: measuring 6 of 6 settings (0 cached)"]


def test_tune_a_second_time_measures_nothing(tmp_path):
    cache, measure, said = tmp_path / "tune.json", FakeMeasure(), []
    first = tune(None, BUDGET, measure, context={"model": "table"}, cache=cache, settings=table_settings())
    again = tune(None, BUDGET, measure, context={"model": "table"}, cache=cache, settings=table_settings(),
                 log=said.append)
    assert measure.count("calibration") == 1
    assert again["measured"] == 0
    assert again["label"] == first["label"] and again["settings"] == first["settings"]
    assert said == [f"tune: all 6 settings cached in {cache}"]
    # another context (other data, machine ...) is measured afresh
    tune(None, BUDGET, measure, context={"model": "table", "seed": 1}, cache=cache, settings=table_settings())
    assert measure.count("calibration") == 2


def test_tune_measures_only_what_the_cache_lacks(tmp_path):
    cache, measure = tmp_path / "tune.json", FakeMeasure()
    tune(None, BUDGET, measure, context={}, cache=cache, settings=table_settings(["tome=2", "tome=4"]))
    result = tune(None, BUDGET, measure, context={}, cache=cache, settings=table_settings(["tome=2", "tome=8",
                                                                                           "tome=4"]))
    assert [labels for part, labels in measure.calls if part == "calibration"] == [["tome=2", "tome=4"],
                                                                                 ["tome=8"]]
    assert result["measured"] == 1 and result["label"] == brute_force(cache, BUDGET) == "tome=4"


@pytest.mark.parametrize("held_psnr, within", [(31.5, True), (29.0, False)])
def test_tune_measures_the_choice_on_held_out_data(tmp_path, held_psnr, within):
    measure = FakeMeasure(held_out={"tome=2,deepcache=3": held_psnr})
    result = tune(None, BUDGET, measure, context={}, cache=tmp_path / "c.json", settings=table_settings())
    held_calls = [labels for part, labels in measure.calls if part == "held-out"]
    assert held_calls == [["tome=2,deepcache=3"]]
    assert result["held_out"]["settings"] == "tome=2,deepcache=3"
    assert result["held_out"]["psnr"] == held_psnr
    assert result["held_out_within_budget"] is within
    assert result["chosen"]["psnr"] == 30.0  # the choice is made on the calibration set


def test_budget_nobody_meets(tmp_path):
    measure = FakeMeasure()
    with pytest.raises(NoSettingMeetsBudget) as caught:
        tune(None, Budget("psnr", 50.0), measure, context={}, cache=tmp_path / "c.json", settings=table_settings())
    message = str(caught.value)
    assert "PSNR vs unpatched, dB >= 50" in message and "the best was evit=0.9 at 45" in message
    assert measure.count("held-out") == 0
    # a setting that meets the budget but is slower than the unpatched model is no answer either
    with pytest.raises(NoSettingMeetsBudget, match="evit=0.9"):
        tune(None, Budget("psnr", 40.0), measure, context={}, cache=tmp_path / "c.json",
             settings=table_settings())
    assert isinstance(caught.value, ValueError)


# -- evaluate + tune end to end on a real model, timed by a deterministic timer -------------------
def fake_seconds(label: str) -> float:
    """Seconds of one call: the more tokens merged or dropped, the faster."""
    methods = parse_setting(label).methods
    seconds = 1.0
    if "tome" in methods:
        seconds /= 1 + methods["tome"] / 4
    if "evit" in methods:
        seconds *= methods["evit"] ** 2
    return seconds


class FakeTimer:
    """``evaluate``'s ``timer``: runs each call once (the model really runs), times it by its label."""

    def __init__(self):
        self.ran = []

    def __call__(self, calls):
        timings = {}
        for label, call in calls.items():
            out = call()
            assert out.shape[1] == 3
            self.ran.append(label)
            timings[label] = Timing(seconds=[fake_seconds(label)], items_per_call=len(out))
        return timings


def test_evaluate_and_tune_on_a_vit(tiny_vit, tmp_path):
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = tiny_vit(x).argmax(-1)  # the unpatched model is right on every image: drops are disagreements
    timer, parts = FakeTimer(), []

    def measure(settings, part):
        parts.append(part)
        cut = slice(0, 32) if part == "calibration" else slice(32, None)
        return evaluate(tiny_vit, settings, images=x[cut], labels=y[cut], timer=timer, batch=16)["rows"]

    budget, cache = Budget("accuracy_drop", 1.0), tmp_path / "tune.json"
    result = tune(tiny_vit, budget, measure, context={"model": "tiny"}, cache=cache)
    settings = candidates(tiny_vit)
    assert parts == ["calibration", "held-out"]
    assert sorted(timer.ran) == sorted([UNPATCHED] + [s.label for s in settings]
                                       + [UNPATCHED, result["label"]])
    rows = {r["settings"]: r for r in json.loads(cache.read_text())["calibration"].values()}
    assert set(rows) == {UNPATCHED} | {s.label for s in settings}
    for label, row in rows.items():
        assert row["speedup"] == pytest.approx(1 / fake_seconds(label))
        assert 0 <= row["accuracy"] <= 1 and row["baseline_accuracy"] == 1.0
        assert row["accuracy_drop"] == pytest.approx(100 * (1 - row["accuracy"]))
    assert result["label"] == brute_force(cache, budget)
    assert result["label"] != UNPATCHED and budget.met(result["chosen"])
    # the budget decided: some faster setting lost too much accuracy
    assert any(r["speedup"] > result["chosen"]["speedup"] and not budget.met(r) for r in rows.values())
    assert result["held_out"]["settings"] == result["label"]
    assert result["held_out_within_budget"] == budget.met(result["held_out"])
    # the choice applies as it is
    patched = accel.patch(make_vit(patch_size=8, depth=2, num_classes=3), **result.settings)
    with torch.inference_mode():
        assert patched(x[:4]).shape == (4, 3)


def test_the_result_reads_as_attributes(tmp_path):
    """``accel.patch(model, **result.settings)``: the result reads as attributes and as a dict."""
    result = tune(None, BUDGET, FakeMeasure(), context={}, cache=tmp_path / "c.json", settings=table_settings())
    assert result.settings == result["settings"] == {"tome": 2, "deepcache": 3}
    assert result.label == "tome=2,deepcache=3" and json.loads(json.dumps(result))["label"] == result.label
    with pytest.raises(AttributeError):
        result.no_such_key


def test_a_process_that_does_not_write_leaves_the_cache_alone(tmp_path):
    cache, measure = tmp_path / "tune.json", FakeMeasure()
    result = tune(None, BUDGET, measure, context={}, cache=cache, settings=table_settings(), write=False)
    assert not cache.exists() and result["label"] == "tome=2,deepcache=3"  # chosen all the same
