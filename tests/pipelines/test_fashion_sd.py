"""The text-to-image pipeline's parts and its training scripts, end to end on tiny settings."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from accel.pipelines.fashion_sd import from_vae_range, to_vae_range
from tests.pipelines.test_data import make_fake_dataset

ROOT = Path(__file__).resolve().parents[2]


def run_script(name, *args):
    cmd = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout


def test_vae_range_round_trip_and_padding():
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    x = to_vae_range(images)
    assert x.shape == (3, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, :, :2], torch.full((3, 1, 2, 32), -1.0))  # background padding
    assert torch.equal(from_vae_range(x), images)


def test_vae_and_sd_training_scripts_make_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    data = make_fake_dataset(tmp_path / "data", n_train=64, n_test=16)
    common = ["--data-root", data, "--max-steps", "2"]
    run_script("train_fashion_clip.py", *common, "--batch-size", "32", "--work-dir", tmp_path / "wc",
               "--out", tmp_path / "clip")
    run_script("train_fashion_vit.py", *common, "--batch-size", "32", "--work-dir", tmp_path / "wv",
               "--out", tmp_path / "vit")
    out = run_script("train_fashion_vae.py", *common, "--batch-size", "32", "--eval-limit", "16",
                     "--work-dir", tmp_path / "wa")
    assert json.loads((tmp_path / "wa" / "vae_metrics.json").read_text())["scaling_factor"] > 0, out
    run_script("train_fashion_sd.py", *common, "--batch-size", "16", "--clip", tmp_path / "clip",
               "--vae", tmp_path / "wa" / "vae", "--classifier", tmp_path / "vit", "--eval-per-class", "1",
               "--eval-steps", "2", "--work-dir", tmp_path / "ws", "--out", tmp_path / "sd")
    metrics = json.loads((tmp_path / "sd" / "metrics.json").read_text())
    assert metrics["images"] == 10 and 0.0 <= metrics["generated_class_accuracy"] <= 1.0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    assert pipe.tokenizer.model_max_length == 16
    image = pipe("a photo of a bag", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 1, 32, 32)


def test_shipped_pipeline_draws_the_prompted_class():
    from accel.pipelines import load
    from accel.pipelines.fashion_sd import generated_class_accuracy

    pipe = load("fashion-sd")
    # 2 images per class at 20 steps; the bar of issue 3 is 0.70 (measured on 200 images in docs/models.md).
    assert generated_class_accuracy(pipe, load("fashion-vit"), per_class=2, steps=20, guidance=3.0) >= 0.7
