"""``accel eval`` and ``accel tune`` from the command line: clear errors (exit 2) before heavy loading where
possible, and small runs on the built-in fashion-vit that write their reports."""
from __future__ import annotations

import json

import pytest

import accel.eval.evaluation as evaluate_module
import accel.eval.inputs as inputs
from accel.cli import main
from accel.eval.timing import Timing
from accel.eval.tuning import Budget

TUNE = ["tune", "--model", "fashion-vit", "--max-accuracy-drop", "100", "--methods", "tome", "--no-compose",
        "--limit", "64", "--held-out", "32", "--batch", "32", "--repeats", "1"]


def fails(capsys, argv, code=2):
    """Run the CLI, expect ``code``; return its message, the last line on stderr (loading bars come first)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"accel {argv[0]}: ")
    return message


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model or its data would be loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model for a command that should fail first")

    monkeypatch.setattr(inputs, "load_subject", refuse)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a bag\n")
    return path


# -- errors before anything heavy -----------------------------------------------------------------
def test_unknown_method(capsys, no_loading):
    err = fails(capsys, ["eval", "--model", "fashion-vit", "--methods", "tome=2", "tomee=2"])
    assert "unknown method 'tomee'" in err and "available:" in err and "tome" in err


def test_malformed_json(capsys, no_loading):
    err = fails(capsys, ["eval", "--model", "fashion-vit", "--methods", '{"tome": 2'])
    assert "malformed JSON" in err and '{"tome": 2' in err


def test_bad_value(capsys, no_loading):
    err = fails(capsys, ["eval", "--model", "fashion-sd", "--methods", "deepcache=0"])
    assert "'deepcache=0'" in err and "interval" in err


def test_path_shorthand_that_does_not_load(capsys, no_loading, tmp_path):
    err = fails(capsys, ["eval", "--model", "fashion-vit", "--methods", f"early_exit={tmp_path / 'none'}"])
    assert "early_exit=" in err and "none" in err


def test_tune_unknown_method(capsys):
    err = fails(capsys, ["tune", "--model", "fashion-vit", "--max-accuracy-drop", "1", "--methods", "tomee"])
    assert "--methods" in err and "tomee" in err


# -- errors about the model and its data ----------------------------------------------------------
def test_empty_prompt_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    err = fails(capsys, ["eval", "--model", "fashion-sd", "--methods", "deepcache=3", "--prompts", str(empty)])
    assert f"--prompts: {empty} has no prompts" in err


def test_missing_prompt_file(capsys, tmp_path):
    err = fails(capsys, ["eval", "--model", "fashion-sd", "--methods", "deepcache=3", "--prompts",
                         str(tmp_path / "nope.txt")])
    assert "--prompts: cannot read" in err


def test_unreadable_reference(capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    err = fails(capsys, ["eval", "--model", "fashion-sd", "--methods", "deepcache=3", "--no-fid", "--per-class",
                         "1", "--reference", str(missing)])
    assert f"--reference: {missing} is not a folder" in err


def test_images_that_are_not_a_folder(capsys, prompts):
    err = fails(capsys, ["eval", "--model", "vit_tiny_patch16_224", "--methods", "tome=2", "--images",
                         str(prompts)])
    assert f"--images: {prompts} is not a folder" in err


def test_timm_model_without_images(capsys):
    err = fails(capsys, ["eval", "--model", "vit_tiny_patch16_224", "--methods", "tome=2"])
    assert "needs --images" in err


def test_model_that_is_nothing_known(capsys, prompts):
    err = fails(capsys, ["eval", "--model", "no-such-model-anywhere", "--methods", "tome=2", "--prompts",
                         str(prompts)])
    assert "'no-such-model-anywhere' is not built in" in err and "fashion-vit" in err


def test_psnr_budget_on_a_classifier(capsys):
    err = fails(capsys, ["tune", "--model", "fashion-vit", "--min-psnr", "30"])
    assert "does not apply to a classifier" in err


def test_held_out_leaves_nothing(capsys):
    err = fails(capsys, ["tune", "--model", "fashion-vit", "--max-accuracy-drop", "1", "--methods", "tome",
                         "--held-out", "1000000"])
    assert "--held-out 1000000 leaves no calibration images" in err


def test_bad_batch(capsys):
    err = fails(capsys, ["eval", "--model", "fashion-vit", "--methods", "tome=2", "--batch", "0"])
    assert "--batch must be >= 1" in err


# -- small successful runs ------------------------------------------------------------------------
def test_eval_writes_a_report(capsys, tmp_path):
    out = tmp_path / "report"
    assert main(["eval", "--model", "fashion-vit", "--methods", "tome=2", "--limit", "64", "--batch", "32",
                 "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unpatched" in printed and "tome=2" in printed and f"wrote {out / 'report.json'}" in printed
    record = json.loads((out / "report.json").read_text())
    rows = {row["settings"]: row for row in record["rows"]}
    assert list(rows) == ["unpatched", "tome=2"]
    assert rows["tome=2"]["methods"] == {"tome": 2}
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["top1_agreement"] <= 1
        assert row["s_per_image"] > 0 and row["speedup"] > 0
        assert row["accuracy_drop"] == pytest.approx(100 * (row["baseline_accuracy"] - row["accuracy"]))
    assert rows["unpatched"]["speedup"] == 1.0 and rows["unpatched"]["top1_agreement"] == 1.0
    meta = record["meta"]
    assert meta["kind"] == "classifier" and meta["count"] == 64 and meta["model"] == "fashion-vit"
    assert [t["rank"] for t in meta["timing"]] == [0]
    assert set(meta["timing"][0]["speedup"]) == {"unpatched", "tome=2"}
    markdown = (out / "report.md").read_text()
    assert "| settings |" in markdown and "| unpatched |" in markdown and "| tome=2 |" in markdown
    plots = sorted(p.name for p in out.glob("*.png"))
    assert "speedup-vs-accuracy.png" in plots
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def label_timer(monkeypatch):
    """Interleaved timing replaced by one call of each setting, timed by its label (ToMe r: the larger
    the faster), so the choice does not depend on the machine's load."""
    def seconds(label):
        return 1.0 if label == "unpatched" else 1 / (1 + int(label.split("=")[1]) / 4)

    def timer(calls, **_):
        return {label: Timing(seconds=[seconds(label)], items_per_call=len(call())) for label, call in calls.items()}

    monkeypatch.setattr(evaluate_module, "time_interleaved", timer)


def test_tune_writes_its_choice_and_reuses_the_cache(capsys, tmp_path, label_timer):
    cache, out = tmp_path / "c.json", tmp_path / "t"
    argv = TUNE + ["--cache", str(cache), "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "fastest within top-1 accuracy drop, points <= 100: tome=" in first
    assert "(0 cached)" in first
    result = json.loads((out / "tune.json").read_text())
    assert isinstance(result["settings"], dict) and list(result["settings"]) == ["tome"]
    assert result["label"] == f"tome={result['settings']['tome']}"
    stored = json.loads(cache.read_text())
    budget = Budget("accuracy_drop", 100)
    best = max((r for r in stored["calibration"].values() if budget.met(r) and r["speedup"] > 1), key=lambda r: r["speedup"])
    assert result["label"] == best["settings"]
    assert result["held_out"]["settings"] == result["label"] and result["held_out_within_budget"] is True
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    assert f"accel.patch(model, **{result['settings']!r})" in first

    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "all" in second and "settings cached" in second
    again = json.loads((out / "tune.json").read_text())
    assert again["settings"] == result["settings"] and again["measured"] == 0
    assert json.loads(cache.read_text()) == stored  # nothing measured (not even the held-out run), nothing rewritten
