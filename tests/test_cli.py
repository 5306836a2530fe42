import json
import re
import time

import pytest

from accel.cli import FULL, QUICK, _resolve, build_parser, estimate_seconds, main
from accel.pipelines import FASHION_CLASSES

TINY_DIFFUSION = ["--steps", "1", "--per-class", "1", "--diffusion-repeats", "1"]


def tables(out):
    """{header line: [split data rows]} of every text table in ``out`` (a table ends at a blank line)."""
    lines, found = out.splitlines(), {}
    for i, line in enumerate(lines):
        if line.startswith("model ") and lines[i + 1].startswith("---"):
            rows = []
            for row in lines[i + 2:]:
                if not row.strip():
                    break
                rows.append(row.split())
            found[line] = rows
    return found


def bench_table(capsys, *args):
    """Run ``accel bench``; return (everything printed, first table header, its split data rows)."""
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    header, rows = next(iter(tables(out).items()))
    return out, header, rows


def test_bench_prints_a_table_for_each_setting(capsys):
    out, _, rows = bench_table(capsys, "--model", "vit_tiny_patch16_224", "--batch", "2", "--r", "0,4",
                               "--repeats", "1")
    assert "seeded random weights" in out
    assert [row[3] for row in rows] == ["r=0", "r=4"]
    # r=0 is the unpatched model: every image agrees, logits identical.
    assert rows[0][-2:] == ["1.000", "1.0000"]
    assert "CPU use while timing" in out


def test_info_and_bad_arguments(capsys):
    assert main(["info"]) == 0
    assert "methods: tome" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--r", "-3"])
    assert main(["bench", "--batch", "0"]) == 2
    assert main(["bench", "--fid-real", "-1"]) == 2
    assert "--fid-real must be >= 0" in capsys.readouterr().err
    assert main(["bench", "--model", "no_such_model"]) == 2
    assert "neither built in" in capsys.readouterr().err
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--full"]) == 2
    assert "--full is for the built-in models" in capsys.readouterr().err


def test_quick_and_full_settings():
    """The quick run (the default, `make run`) is a few minutes on 2 cores; explicit options win."""
    quick = _resolve(build_parser().parse_args(["bench"]))
    full = _resolve(build_parser().parse_args(["bench", "--full"]))
    assert (quick.batch, quick.r, quick.fid_real, quick.diffusion) == (256, [2, 3, 4], 0, ("fashion-sd",))
    assert (full.batch, full.r, full.fid_real, full.diffusion) == (64, [1, 2, 3], 500, ("fashion-sd", "fashion-dit"))
    assert estimate_seconds(quick) < 200 and estimate_seconds(full) > 3 * estimate_seconds(quick)
    mine = _resolve(build_parser().parse_args(["bench", "--full", "--batch", "8", "--fid-real", "0"]))
    assert (mine.batch, mine.fid_real, mine.repeats) == (8, 0, FULL["repeats"])
    timm = _resolve(build_parser().parse_args(["bench", "--model", "vit_small_patch16_224"]))
    assert (timm.batch, timm.r, timm.repeats) == (64, [8, 16], 5) and QUICK["batch"] == 256


def test_default_bench_shows_the_settings_that_pay(capsys, tmp_path):
    out, header, vit = bench_table(capsys, "--batch", "8", "--eval-images", "200", "--repeats", "1", "--r", "0,2",
                                   *TINY_DIFFUSION, "--out", str(tmp_path))
    assert out.startswith("accel bench: the built-in models at the settings where the methods pay; about ")
    assert "fashion-vit (built-in timm ViT trained on Fashion-MNIST" in out
    assert "baseline accuracy" in header and "patched accuracy" in header
    assert [(row[2], row[3]) for row in vit] == [("tome", "r=0"), ("tome", "r=2"), ("early_exit", "shipped"),
                                                 ("avit", "eps")]
    r0, r2, exit_heads, avit = vit
    assert r0[-2] == r0[-1]  # r=0: the unpatched model's accuracy exactly
    assert float(r0[-2]) >= 0.85 and float(r2[-1]) >= 0.8
    assert float(exit_heads[-1]) >= 0.8 and float(avit[-1]) >= 0.8  # the shipped adaptive models hold accuracy
    sd_header, sd = list(tables(out).items())[1]
    assert [row[1:4] for row in sd] == [["-", "unpatched", "1"], ["deepcache", "deepcache", "3"],
                                        ["deepcache", "deepcache", "5"]]
    assert "FID" not in sd_header and "CLIP score" in sd_header  # FID only with --full or --fid-real
    assert "model: fashion-sd" in out and "fashion-dit" not in out
    assert (tmp_path / "fashion-sd" / "grid.png").exists() and not (tmp_path / "fashion-dit").exists()
    assert (tmp_path / "fashion-vit" / "report.json").exists()  # accel bench is accel eval's code path


def test_full_bench_keeps_every_setting_fid_and_fashion_dit(capsys, tmp_path):
    # FID (on by default with --full, see above) is covered by the fashion-sd test below; off here for time.
    assert main(["bench", "--full", "--batch", "8", "--eval-images", "16", "--repeats", "1", "--r", "1",
                 *TINY_DIFFUSION, "--fid-real", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accel bench: every setting on every built-in model, with FID; about ")
    found = list(tables(out).items())
    assert len(found) == 3
    (_, vit), (sd_header, sd), (dit_header, dit) = found
    assert [row[3] for row in vit] == ["r=1", "shipped", "eps"]
    assert "FID" not in sd_header and "CLIP score" in dit_header
    assert [row[0] for row in dit] == ["fashion-dit"] * 3 and dit[1][2:4] == ["tome", "0.5"]
    assert "tome+deepcache" in [row[1] for row in sd] and len(sd) == 5
    assert (tmp_path / "fashion-dit" / "grid.png").exists()


@pytest.mark.parametrize("cpu_share, warned", [(0.25, True), (100.0, False)])
def test_busy_machine_warning_in_the_output_and_the_report(capsys, tmp_path, monkeypatch, cpu_share, warned):
    """The process CPU clock is faked at ``cpu_share`` CPU seconds per wall second: a quarter of a
    thread is a busy machine, a hundred threads never is."""
    import accel.eval.timing as timing

    monkeypatch.setattr(timing, "process_cpu_seconds", lambda: cpu_share * time.perf_counter())
    report = tmp_path / "bench.md"
    out, _, rows = bench_table(capsys, "--model", "vit_tiny_patch16_224", "--batch", "2", "--r", "2",
                               "--repeats", "2", "--report", str(report))
    assert len(rows) == 1
    assert ("warning: the machine was busy" in out) == warned
    assert ("warning: the machine was busy" in report.read_text()) == warned
    used = float(re.search(r"CPU use while timing: ([0-9.]+) of", out).group(1))
    assert used == pytest.approx(cpu_share, rel=0.05)


def test_bench_on_a_built_in_diffusion_pipeline_reports_quality_and_writes_a_grid(capsys, tmp_path):
    from PIL import Image

    assert main(["bench", "--model", "fashion-sd", "--steps", "2", "--per-class", "1", "--fid-real", "10",
                 "--diffusion-repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header, rows = next(iter(tables(out).items()))
    assert "FID" in header
    assert rows[0][:3] == ["fashion-sd", "-", "unpatched"] and rows[0][5] == "1.00"
    assert [row[3] for row in rows[1:]] == ["3", "5"]  # the quick run's DeepCache settings
    fid, clip, accuracy = map(float, rows[0][-3:])
    assert fid > 0 and clip > 0 and 0 <= accuracy <= 1
    from accel.eval.grid import LEFT_MARGIN, TOP_MARGIN

    grid = Image.open(tmp_path / "fashion-sd" / "grid.png")  # a column per setting, a row per class
    cell = 28 * 5  # 28-pixel images upscaled 5x, so that the settings' labels fit above them
    assert grid.size == (LEFT_MARGIN + len(rows) * cell, TOP_MARGIN + 10 * cell)
    report = json.loads((tmp_path / "fashion-sd" / "report.json").read_text())
    assert [p["prompt"] for p in report["per_image"]] == [f"a photo of a {c}" for c in FASHION_CLASSES]
    fid = report["rows"][1]["fid_vs_unpatched"]
    assert fid["low"] <= fid["value"] <= fid["high"] and report["rows"][0]["fid_vs_reference"]["value"] > 0


def test_bench_llm_measures_the_shipped_study_models(capsys):
    assert main(["bench", "--llm", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    header, rows = next(iter(tables(out).items()))
    assert "held-out loss" in header and "decoding vs dense" in header
    assert [row[0] for row in rows] == ["study-dense", "study-moe", "study-mod"]
    assert rows[0][-1] == "1.00"  # the dense model against itself
    assert main(["bench", "--llm", "--full"]) == 2
    assert "--llm runs the built-in language models" in capsys.readouterr().err
