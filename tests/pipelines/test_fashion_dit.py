"""The class-conditional DiT pipeline: its training script end to end on tiny settings, and the shipped weights."""
import json

import torch

from tests.pipelines.test_data import make_fake_dataset
from tests.pipelines.test_fashion_sd import ROOT, run_script


def test_dit_training_script_makes_a_loadable_pipeline_with_named_classes(tmp_path):
    from diffusers import DiTPipeline

    data = make_fake_dataset(tmp_path / "data", n_train=64, n_test=16)
    run_script("train_fashion_dit.py", "--data-root", data, "--max-steps", "2", "--batch-size", "16",
               "--vae", ROOT / "assets" / "fashion-sd" / "vae", "--eval-per-class", "1", "--eval-steps", "2",
               "--work-dir", tmp_path / "w", "--out", tmp_path / "dit")
    metrics = json.loads((tmp_path / "dit" / "metrics.json").read_text())
    assert metrics["images"] == 10 and metrics["steps"] == 2 and 0.0 <= metrics["generated_class_accuracy"] <= 1.0
    pipe = DiTPipeline.from_pretrained(tmp_path / "dit", local_files_only=True)
    assert pipe.get_label_ids(["t-shirt/top", "ankle boot"]) == [0, 9]
    # guidance uses class 1000 as the null label: the tables have a row for it
    assert pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 1001
    image = pipe(class_labels=[8], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 1, 32, 32)


def test_shipped_dit_draws_the_requested_class():
    from diffusers import DiTPipeline

    from accel.pipelines import load
    from accel.pipelines.fashion_sd import generated_class_accuracy

    pipe = load("fashion-dit")
    assert isinstance(pipe, DiTPipeline) and pipe.get_label_ids(["sneaker"]) == [7]
    # 2 images per class at 20 steps; the bar of issue 3 is 0.70 (measured on 200 images in docs/models.md).
    assert generated_class_accuracy(pipe, load("fashion-vit"), per_class=2, steps=20, guidance=3.0) >= 0.7
