"""The demo's handlers without a browser: every method of both tabs, bad input, presets, the port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from accel.demo import (NO_METHOD, Demo, _classification_controls, _preset_controls, _presets,
                        methods_for_generation)
from accel.pipelines import FASHION_CLASSES, load, load_test_subset
from accel.pipelines.fashion_vit import preprocess


@pytest.fixture(scope="module")
def demo():
    return Demo()


@pytest.mark.parametrize("method, caption", [("ToMe", "ToMe: the 49 patches of image 0 ended in"),
                                             ("EViT", "EViT"), ("A-ViT", "A-ViT"), ("early exit", "Early exit"),
                                             ("token exit", "Token exit")])
def test_every_classification_method_runs_and_shows_what_it_did(demo, method, caption):
    shown, base, fast, timing, views, captions, message = demo.classify(None, 5, method, 3, 0.7, 0.3, 0.01, 1.0)
    assert message == "" and views is not None and views.dtype == np.uint8
    assert caption in captions
    images, _ = load_test_subset()
    with torch.inference_mode():  # the unpatched side is the library's model on the same image
        expected = load("fashion-vit")(preprocess(images[5:6])).softmax(-1)[0]
    assert list(base) == list(FASHION_CLASSES)
    assert np.allclose([base[c] for c in FASHION_CLASSES], expected.numpy(), atol=1e-6)
    assert sum(fast.values()) == pytest.approx(1.0, abs=1e-5)
    assert shown.shape == (224, 224, 3) and "x** with" in timing


def test_an_uploaded_colour_picture_is_classified_as_a_grey_28_pixel_image(demo):
    picture = np.random.default_rng(0).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    shown, base, *_, message = demo.classify(picture, 0, "ToMe", 2, 0.7, 0.3, 0.01, 1.0)
    assert message == "" and shown.shape == (224, 224, 3)
    assert np.array_equal(shown[..., 0], shown[..., 1])  # grey


def test_regioncache_on_a_dit_and_errors_in_the_page(demo):
    base, fast, timing, views, captions, message = demo.generate("fashion-dit", "a photo of a sneaker", 1, 4, 3.0,
                                                                 0, "merge", 0, 0, 0.5)
    assert message == "" and "RegionCache" in captions and base.shape == fast.shape
    # a method that does not apply to the model, a class the DiT does not know, nothing chosen
    *_, message = demo.generate("fashion-sd", "a photo of a bag", 1, 2, 3.0, 0, "merge", 0, 0, 0.5)
    assert message.startswith("**Error:** region_cache") and "supported" in message
    *_, message = demo.generate("fashion-dit", "a photo of a unicorn", 1, 2, 3.0, 0, "merge", 0, 0, 0.5)
    assert "draws classes" in message and "sneaker" in message
    *_, message = demo.generate("fashion-sd", "a bag", 1, 2, 3.0, 0, "merge", 0, 0, 0)
    assert message == f"**Error:** {NO_METHOD}"
    *_, message = demo.generate("fashion-sd", "a bag", 1, 2, 3.0, 0, "merge", 3, -1, 0)
    assert message.startswith("**Error:** setting") and "branch" in message  # out of range, before the model runs
    # and the app's model is left unpatched after errors and runs alike
    import accel

    assert accel.describe(demo.pipeline("fashion-sd"))["methods"] == {}


def test_the_controls_follow_the_model():
    from accel.demo import controls_for

    deepcache, branch, region = controls_for("fashion-dit")  # a DiT: RegionCache, no DeepCache
    assert (deepcache, region) == ({"visible": False, "value": 0}, {"visible": True, "value": 0.5})
    deepcache, branch, region = controls_for("fashion-sd")
    assert deepcache["visible"] and not region["visible"] and region["value"] == 0
    assert all(c["visible"] for c in controls_for("/my/pipeline"))


def test_controls_map_to_patch_keywords():
    assert methods_for_generation(0, "merge", 0, 0, 0) == {}
    assert methods_for_generation(0.5, "merge", 3, 1, 0) == {"tome": {"ratio": 0.5},
                                                             "deepcache": {"interval": 3, "branch": 1}}
    assert methods_for_generation(0.5, "downsample", 1, 0, 0.25) == {
        "tome": {"mode": "downsample"}, "deepcache": {"interval": 1, "branch": 0}, "region_cache": {"ratio": 0.25}}


def test_presets_come_from_tune_results(tmp_path):
    sd, vit, junk = tmp_path / "sd.json", tmp_path / "vit.json", tmp_path / "junk.json"
    sd.write_text(json.dumps({"model": "fashion-sd", "label": "tome=0.75,deepcache=3", "budget": "PSNR >= 30",
                              "settings": {"tome": 0.75, "deepcache": 3}}))
    vit.write_text(json.dumps({"model": "fashion-vit", "label": "tome=3", "settings": {"tome": 3}}))
    junk.write_text("not json")
    generation = _presets([sd, vit, junk, tmp_path / "missing.json"], classifier=False)
    assert list(generation) == ["fashion-sd: tome=0.75,deepcache=3 (PSNR >= 30)"]
    assert _preset_controls(next(iter(generation.values()))) == (0.75, "merge", 3, 0, 0.0)
    classification = _presets([sd, vit], classifier=True)
    assert _classification_controls(next(iter(classification.values()))) == ("ToMe", 3.0, 0.7, 0.3)
    assert _classification_controls({"evit": {"keep_rate": 0.5}}) == ("EViT", 3.0, 0.5, 0.3)


def test_import_accel_does_not_import_gradio_and_the_port_comes_from_gradio_server_port(monkeypatch):
    code = "import sys, accel, accel.cli; assert 'gradio' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from accel.demo import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))
    app = launch(block=False)
    try:
        assert app.server_port == port and app.server_name == "127.0.0.1" and not app.share
        assert "127.0.0.1" in os.environ["NO_PROXY"].split(",")
    finally:
        app.close()


def test_a_local_diffusers_folder_typed_as_the_model(demo, tmp_path):
    load("fashion-sd").save_pretrained(tmp_path / "mine")
    base, fast, timing, views, captions, message = demo.generate(str(tmp_path / "mine"), "a photo of a bag", 3, 2,
                                                                 3.0, 0, "merge", 2, 0, 0)
    assert message == "" and "DeepCache" in captions
    assert base.shape == (224, 224, 3)  # the pipeline's own 32x32 RGB output, enlarged 7x
    *_, message = demo.generate(str(tmp_path), "a photo of a bag", 3, 2, 3.0, 0, "merge", 2, 0, 0)
    assert "is neither built in" in message  # a folder that is not a pipeline


def test_accel_demo_without_gradio_says_how_to_get_it(capsys, monkeypatch):
    import importlib.util

    from accel.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["demo"]) == 2
    assert "pip install 'accel-toolkit[demo]'" in capsys.readouterr().err
