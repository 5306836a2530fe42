"""The CLIP tokenizer, processor and the training script of the built-in text-image model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from accel.pipelines import FASHION_CLASSES, load_test_subset
from accel.pipelines.fashion_clip import build_processor, caption_corpus, load_fashion_clip, pixel_values
from accel.pipelines.tokenizer import learn_bpe
from tests.pipelines.test_data import make_fake_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_bpe_merges_on_a_hand_checked_corpus():
    # "aa" twice as often as anything else: merged first; ties broken by the pair itself.
    merges = learn_bpe(["aab aab ab"])
    assert merges[0] == ("a", "b</w>")  # 'a b</w>' occurs 3 times, 'a a' twice
    assert merges[1] == ("a", "ab</w>")
    assert len(merges) == 2  # both words are single symbols now


def test_tokenizer_covers_corpus_words_and_any_text():
    tokenizer = build_processor().tokenizer
    for caption in caption_corpus():
        ids = tokenizer(caption)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)[1:-1]
        words = caption.replace("-", " - ").replace("/", " / ").split()
        assert len(tokens) == len(words)  # one token per word (and per punctuation mark)
    unseen = tokenizer("a zebra")["input_ids"]
    assert tokenizer.unk_token_id not in unseen[1:-1]  # spelled out from byte-level characters
    assert tokenizer.decode(unseen, skip_special_tokens=True) == "a zebra"


def test_processor_matches_the_fast_tensor_path():
    images, _ = load_test_subset()
    processor = build_processor()
    pil = [Image.fromarray(np.asarray(img), mode="L") for img in images[:4]]
    slow = processor(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(slow, pixel_values(images[:4]), rtol=1e-5, atol=1e-5)


def test_training_script_smoke_and_reload(tmp_path):
    data = make_fake_dataset(tmp_path / "data", n_train=64, n_test=20)
    cmd = [sys.executable, str(ROOT / "scripts" / "train_fashion_clip.py"), "--data-root", str(data),
           "--batch-size", "32", "--epochs", "1", "--max-steps", "2", "--work-dir", str(tmp_path / "work"),
           "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert "zero-shot accuracy" in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["test_images"] == 20
    assert {"vocab.json", "merges.txt", "config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    model, processor = load_fashion_clip(tmp_path / "out")
    assert model.config.projection_dim == 64 and len(processor.tokenizer) > len(FASHION_CLASSES)


def test_shipped_clip_zero_shot_accuracy_on_a_fixed_slice():
    from accel.pipelines import load
    from accel.pipelines.fashion_clip import zero_shot_logits

    model, processor = load("fashion-clip")
    images, labels = load_test_subset()
    logits = zero_shot_logits(model, processor.tokenizer, images[:500])
    assert (logits.argmax(-1) == labels[:500]).float().mean() >= 0.75  # the bar of issue 3
