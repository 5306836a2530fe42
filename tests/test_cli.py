import pytest

from accel.cli import main


def test_bench_prints_a_table_for_each_setting(capsys):
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "2", "--r", "0,4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "seeded random weights" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "batch"])
    rows = lines[header + 2:header + 4]
    assert rows[0].split()[3] == "r=0" and rows[1].split()[3] == "r=4"
    # r=0 is the unpatched model: every image agrees, logits identical.
    assert rows[0].split()[-2:] == ["1.000", "1.0000"]


def test_info_and_bad_arguments(capsys):
    assert main(["info"]) == 0
    assert "methods: tome" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--r", "-3"])
    assert main(["bench", "--batch", "0"]) == 2


def test_default_bench_runs_on_the_built_in_trained_vit(capsys):
    assert main(["bench", "--batch", "8", "--eval-images", "200", "--repeats", "1", "--r", "0,2"]) == 0
    out = capsys.readouterr().out
    assert "fashion-vit (built-in timm ViT trained on Fashion-MNIST" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "batch"])
    assert "baseline accuracy" in lines[header] and "patched accuracy" in lines[header]
    r0, r2 = (lines[header + k].split() for k in (2, 3))
    assert r0[3] == "r=0" and r0[-2] == r0[-1]  # r=0: the unpatched model's accuracy exactly
    assert float(r0[-2]) >= 0.85 and float(r2[-1]) >= 0.8
