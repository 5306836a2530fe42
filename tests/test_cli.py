import pytest

from accel.cli import main


def bench_table(capsys, *args):
    """Run ``accel bench``; return (everything printed, table header, split data rows)."""
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "batch"])
    return out, lines[header], [line.split() for line in lines[header + 2:] if line.strip()]


def test_bench_prints_a_table_for_each_setting(capsys):
    out, _, rows = bench_table(capsys, "--model", "vit_tiny_patch16_224", "--batch", "2", "--r", "0,4",
                               "--repeats", "1")
    assert "seeded random weights" in out
    assert [row[3] for row in rows] == ["r=0", "r=4"]
    # r=0 is the unpatched model: every image agrees, logits identical.
    assert rows[0][-2:] == ["1.000", "1.0000"]


def test_info_and_bad_arguments(capsys):
    assert main(["info"]) == 0
    assert "methods: tome" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--r", "-3"])
    assert main(["bench", "--batch", "0"]) == 2


def test_default_bench_runs_on_every_built_in_model(capsys, tmp_path):
    tiny = ["--steps", "1", "--per-class", "1", "--fid-real", "10", "--diffusion-repeats", "1", "--out", str(tmp_path)]
    out, header, rows = bench_table(capsys, "--batch", "8", "--eval-images", "200", "--repeats", "1", "--r", "0,2",
                                    *tiny)
    r0, r2 = rows[:2]
    assert "fashion-vit (built-in timm ViT trained on Fashion-MNIST" in out
    assert "baseline accuracy" in header and "patched accuracy" in header
    assert r0[3] == "r=0" and r0[-2] == r0[-1]  # r=0: the unpatched model's accuracy exactly
    assert float(r0[-2]) >= 0.85 and float(r2[-1]) >= 0.8
    assert "model: fashion-sd" in out and "model: fashion-dit" in out
    assert (tmp_path / "fashion-sd-grid.png").exists() and (tmp_path / "fashion-dit-grid.png").exists()


def test_bench_on_a_built_in_diffusion_pipeline_reports_quality_and_writes_a_grid(capsys, tmp_path):
    from PIL import Image

    assert main(["bench", "--model", "fashion-sd", "--steps", "2", "--per-class", "1", "--fid-real", "10",
                 "--diffusion-repeats", "1", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model") and "FID" in line)
    rows = [line.split() for line in lines[header + 2:] if line.startswith("fashion-sd")]
    assert rows[0][:3] == ["fashion-sd", "-", "unpatched"] and rows[0][5] == "1.00"
    fid, clip, accuracy = map(float, rows[0][-3:])
    assert fid > 0 and clip > 0 and 0 <= accuracy <= 1
    grid = Image.open(tmp_path / "fashion-sd-grid.png")
    assert grid.size == (10 * 28 * 2, len(rows) * 28 * 2)
