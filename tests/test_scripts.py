"""The benchmark script runs end to end on tiny settings and writes its outputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_vit_writes_json_and_markdown(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_vit.py"), "--models", "vit_tiny_patch16_224",
           "--batches", "1,2", "--r", "0,4", "--repeats", "1", "--repeats-batch1", "1",
           "--agreement-batch", "2", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    data = json.loads((tmp_path / "bench_vit.json").read_text())
    assert [(row["batch"], row["settings"]) for row in data["rows"]] == [(1, "r=0"), (1, "r=4"), (2, "r=0"), (2, "r=4")]
    assert data["rows"][0]["top1_agreement"] == 1.0  # r=0 is the unpatched model
    md = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- bench_vit:start -->" in md and "| vit_tiny_patch16_224 | 2 | tome | r=4 |" in md


@pytest.mark.parametrize("script", ["bench_vit.py", "bench_diffusion.py"])
def test_half_precision_is_refused_on_the_cpu(script):
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--dtype", "float16", "--no-write"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--dtype" in done.stderr and "GPU" in done.stderr


def test_gpu_probe_says_what_it_needs():
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_probe.py"), "deepcache"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "needs a CUDA device" in done.stderr


def test_bench_diffusion_runs_every_variant_and_writes_markdown(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_diffusion.py"), "--config", "tiny", "--steps", "3",
           "--repeats", "1", "--repeats-large", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads((tmp_path / "bench_diffusion.json").read_text())["rows"]
    ours = [row for row in rows if row["method"].startswith("accel")]
    assert {row["settings"] for row in ours} >= {"tome 0.5", "deepcache 3", "tome 0.5 + deepcache 3"}
    assert all(row["speedup"] > 0 and row["psnr"] > 20 for row in ours)  # close to the unpatched latents
    assert "<!-- bench_diffusion:start -->" in (tmp_path / "benchmarks.md").read_text()


def test_bench_adaptive_runs_every_method_and_writes_table_and_plot(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_adaptive.py"), "--limit", "64", "--timing-images", "32",
           "--batch", "32", "--repeats", "1", "--avit", "0.01", "--exit-budgets", "0.005",
           "--exit-thresholds", "1.5", "--evit", "1.0,0.7", "--token-exit", "0.2", "--tome", "2",
           "--region-cache", "0.5", "--dit-steps", "6", "--dit-per-class", "1", "--dit-repeats", "1",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    data = json.loads((tmp_path / "bench_adaptive.json").read_text())
    rows = {(row["method"], row["settings"]): row for row in data["rows"]}
    assert {"avit", "early_exit", "evit", "token_exit", "tome"} <= {method for method, _ in rows}
    assert {settings for method, settings in rows if method == "avit"} == {"eps 0.01, remove", "eps 0.01, mask"}
    unpatched = rows[("-", "unpatched")]
    for identity in rows[("evit", "keep rate 1.0")], rows[("early_exit", "max prob >= 1.5")]:  # never reduce/exit
        assert identity["accuracy"] == unpatched["accuracy"] and identity["drop_points"] == 0.0
    removal, masked = rows[("avit", "eps 0.01, remove")], rows[("avit", "eps 0.01, mask")]
    assert removal["accuracy"] == pytest.approx(masked["accuracy"], abs=1.5 / 64)  # same outputs, up to float ties
    assert [row["settings"] for row in data["dit_rows"]] == ["unpatched", "region_cache 0.5"]
    assert 0.0 < data["dit_rows"][1]["psnr"] <= 100.0
    png = tmp_path / "bench_adaptive.png"
    assert png.read_bytes().startswith(b"\x89PNG") and data["where"].endswith("-thread CPU")
    md = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- bench_adaptive:start -->" in md and "(bench_adaptive.png)" in md
    png.unlink()  # --plot-only redraws it from the JSON alone, beside the JSON
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_adaptive.py"), "--plot-only",
           str(tmp_path / "bench_adaptive.json")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_kernels_writes_each_section_as_it_finishes(tmp_path):
    out = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["bipartite_merge", "best_match", "weighted_merge", "mean_merge", "unmerge",
                                       "amax_merge", "gather_tokens", "scatter_tokens", "compact_tokens",
                                       "compact_tokens images"]  # attention: GPU only
    assert {r["backend"] for r in rows} == {"torch"}
    assert all(r["ms"] > 0 and r["speedup"] == 1.0 for r in rows)  # the CPU times the reference only
    assert "torch reference only (CPU)" in done.stdout


def test_gpu_probe_adaptive_sets_both_methods_to_the_asked_depth():
    """The ViT-B-sized A-ViT / early-exit probe, on its CPU toy: both methods calibrated to a mean
    depth of 2 of 4 blocks (early exit can only stop after blocks 1, 2 or 3), then timed."""
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_probe.py"), "adaptive", "--small"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (result,) = json.loads(done.stdout.strip().splitlines()[-1]).values()
    assert result["unpatched"]["mean depth"] == 4 and result["unpatched"]["speedup"] == 1.0
    depths = {label.split()[0]: row["mean depth"] for label, row in result.items() if label != "unpatched"}
    assert abs(depths["avit"] - 2.0) < 0.5 and 1.0 <= depths["early_exit"] <= 3.0


def test_bench_llm_measures_the_shipped_draft_and_prompt_lookup_against_generate(tmp_path, smollm2_cache):
    """The speculative-decoding benchmark on the built-in pair, two short held-out requests as one
    batch: accel's rows (no drafting, the shipped draft, prompt lookup) equal batched greedy
    generate's tokens, with acceptance figures, and transformers' assisted generation is recorded
    as refusing the batch."""
    import os

    out = tmp_path / "llm.json"
    env = dict(os.environ, ACCEL_CACHE=str(smollm2_cache[0]))
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_llm.py"), "--quick", "--batch", "2", "--lookup",
           "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=env)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    ours = {"accel loop, no draft", "accel loop, no draft, F.linear", "accel shipped draft", "accel prompt lookup",
            "accel shipped draft + prompt lookup", "accel shipped EAGLE head", "accel shipped EAGLE head + prompt lookup",
            "accel shipped EAGLE head + prompt lookup, F.linear"}
    assert set(rows) == ours | {"generate", "transformers assistant_model (its defaults)",
                                "transformers assistant_model (same k)", "transformers prompt lookup"}
    for variant in ours:
        ours = rows[variant]
        assert ours["batch"] == 2 and ours["equal to generate"] == "yes" and ours["tokens/s"] > 0, variant
    assert "acceptance" not in rows["accel loop, no draft"]  # nothing drafted
    assert 0 < rows["accel shipped draft"]["acceptance"] <= 1 and rows["accel shipped draft"]["mean accepted length"] > 1
    for variant in ("transformers assistant_model (its defaults)", "transformers prompt lookup"):
        assert rows[variant]["equal to generate"].startswith("refused"), variant


def test_bench_llm_measures_the_shipped_eagle_head_and_the_costs_of_a_pass(tmp_path, smollm2_cache):
    """At batch size 1 the shipped EAGLE head's rows (alone and with prompt lookup, with
    ``few_rows_linear`` and with ``F.linear``) equal greedy generate's tokens; ``--costs`` times the
    target checking positions both ways and the proposers' steps."""
    import os

    env = dict(os.environ, ACCEL_CACHE=str(smollm2_cache[0]))
    out = tmp_path / "llm.json"
    base = [sys.executable, str(ROOT / "scripts" / "bench_llm.py"), "--quick", "--threads", "1", "--out", str(out)]
    subprocess.run(base + ["--no-draft"], check=True, capture_output=True, text=True, timeout=300, env=env)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    eagle = {"accel shipped EAGLE head", "accel shipped EAGLE head + prompt lookup",
             "accel shipped EAGLE head + prompt lookup, F.linear"}
    assert set(rows) == eagle | {"generate", "accel loop, no draft", "accel loop, no draft, F.linear"}
    for variant in eagle:
        assert rows[variant]["equal to generate"] == "yes" and rows[variant]["mean accepted length"] >= 1, variant
    subprocess.run(base + ["--costs"], check=True, capture_output=True, text=True, timeout=300, env=env)
    costs = json.loads(out.read_text())["costs_ms"]
    assert [f"target, {w} positions, {how}" for w in (1, 4) for how in ("F.linear", "few_rows_linear")] == \
        list(costs)[:4]
    assert {"draft model, one step", "EAGLE head, 1 proposed", "EAGLE head, 4 proposed"} <= set(costs)
    assert all(ms > 0 for ms in costs.values())
    subprocess.run(base + ["--costs", "--batch", "2"], check=True, capture_output=True, text=True, timeout=300, env=env)
    costs = json.loads(out.read_text())["costs_ms"]
    assert list(costs) == [f"target, {w} positions x 2 rows, {how}" for w in (1, 4)
                           for how in ("F.linear", "few_rows_linear")] + \
        ["target, 4 positions x 2 rows, few_rows_linear, transformers sdpa"] and all(ms > 0 for ms in costs.values())


def test_bench_moe_times_every_experts_backend_and_compares_outputs(tmp_path):
    """Small shapes: every backend (transformers' three and accel's) timed at both sizes, each
    output equal to eager's, and accel's row set against the best of transformers'."""
    out = tmp_path / "moe.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_moe.py"), "--quick", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["shape"], r["tokens"], r["backend"]) for r in rows} == {
        (shape, tokens, backend) for shape in ("mixtral-like", "deepseek-like") for tokens in (8, 64)
        for backend in ("eager", "batched_mm", "grouped_mm", "accel")}
    for row in rows:
        assert row["ms"] > 0 and row["max |diff| vs eager"] < 1e-4, row
        if row["backend"] == "accel":
            assert row["best transformers"] in ("eager", "batched_mm", "grouped_mm") and row["vs best transformers"] > 0


def test_train_llm_study_runs_every_stage_and_its_export_loads(tmp_path):
    """Tiny text, vocabulary, budget and windows: the tokenizer is trained on held-in files only, each
    model trains to the same compute (the MoD one taking more steps), the evaluation, the table and
    plot, and an export that ``load_study_model`` reads back with the loss it recorded."""
    from accel.eval.llm import heldout_loss
    from accel.pipelines.llm_study import heldout_tokens, load_study_model

    docs = tmp_path / "docs"
    for i in range(30):  # held_out() keeps files whose path hashes to 0 mod 10 apart
        (docs / f"d{i}").mkdir(parents=True)
        (docs / f"d{i}" / "page.rst.txt").write_text(
            f"Section {i}\n\nThe function returns a list of values. " * 20 + "\n\nA dict maps keys to values.\n")
    work, out, assets = tmp_path / "work", tmp_path / "out", tmp_path / "assets"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_llm_study.py"), "all", "--docs", str(docs),
                    "--work", str(work), "--docs-out", str(out), "--assets", str(assets), "--vocab", "300",
                    "--batch", "2", "--context", "16", "--budget", "2e9", "--log-every", "4", "--log-windows", "2",
                    "--threads", "1", "--prompts", "1", "--prompt-tokens", "4", "--new-tokens", "3", "--repeats", "1",
                    "--ship-tokens", "200"], check=True, capture_output=True, text=True, timeout=600)
    logs = {arch: json.loads((work / arch / "log.json").read_text()) for arch in ("dense", "moe", "mod")}
    assert logs["mod"]["steps"] > logs["dense"]["steps"] > 0
    for log in logs.values():  # the same budget, spent
        assert log["steps"] * log["step_flops"] <= 2e9 < (log["steps"] + 1) * log["step_flops"]
        assert log["points"][-1]["step"] == log["steps"]
    record = json.loads((out / "llm_study.json").read_text())
    assert [row["arch"] for row in record["rows"]] == ["dense", "moe", "mod"]
    assert 0 <= record["rows"][2]["predictor agreement"] <= 1 and (out / "llm_study.png").stat().st_size > 0
    assert len(heldout_tokens(assets)) == 200
    for arch in ("dense", "moe", "mod"):
        model, tokenizer = load_study_model(arch, assets)
        recorded = json.loads((assets / arch / "config.json").read_text())["shipped held-out loss"]
        assert heldout_loss(model, heldout_tokens(assets), 16, 8) == pytest.approx(recorded["loss"], abs=1e-5)
        assert len(tokenizer) == 300 and tokenizer.decode(tokenizer("A dict maps keys")["input_ids"]) == "A dict maps keys"
