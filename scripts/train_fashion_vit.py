"""Train the built-in ViT classifier on Fashion-MNIST; seeded and resumable.

    python scripts/train_fashion_vit.py                    # full run: writes assets/fashion-vit/
    python scripts/train_fashion_vit.py --max-steps 3 ...  # a smoke run (tests)

A checkpoint (model, optimiser, schedule, step) is written to --work-dir every
--checkpoint-every steps; rerunning the same command resumes from it. Batches and
augmentation are seeded per epoch and step (accel.pipelines.training), so a resumed run sees the
same data as an uninterrupted one. Only the final weights go to assets/ (fp16 safetensors), with
config.json holding the model arguments and the test accuracy measured on the saved weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path, PosixPath

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import replace_section  # noqa: E402
from accel.pipelines.data import load_fashion_mnist  # noqa: E402
from accel.pipelines.training import (  # noqa: E402
    add_training_args, augment, batch_indices, recorded_args, step_generator, train_loop,
)
from accel.pipelines.fashion_vit import FASHION_VIT_ARGS, build_fashion_vit, load_fashion_vit, preprocess  # noqa: E402


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(preprocess(images[start:start + batch]))
        correct += (logits.argmax(-1) == labels[start:start + batch]).sum().item()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, epochs=4, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_steps=200,
                      work_dir=ROOT / ".train" / "fashion-vit")
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from the model weights of this checkpoint (a second training stage)")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-vit")
    args = parser.parse_args()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root, limit=args.train_limit)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root, limit=args.eval_limit)

    torch.manual_seed(args.seed)
    model = build_fashion_vit(drop_path_rate=args.drop_path)
    if args.init_from:
        with torch.serialization.safe_globals([PosixPath]):  # older checkpoints stored their paths
            model.load_state_dict(torch.load(args.init_from, map_location="cpu")["model"])

    def loss_at(step: int) -> torch.Tensor:
        _, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        x = augment(preprocess(train_x[idx]), step_generator(args.seed, step))
        return F.cross_entropy(model(x), train_y[idx], label_smoothing=args.label_smoothing)

    def after_epoch(epoch: int) -> None:
        print(f"epoch {epoch} done: test accuracy {accuracy(model, test_x, test_y):.4f}", flush=True)

    step, total = train_loop(model, loss_at, num_items=len(train_x), args=args, after_epoch=after_epoch)
    # Ship fp16 weights; the figures below are measured on them after reloading.
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(args.out / "model.safetensors"))
    config = {"model_args": FASHION_VIT_ARGS, "train": recorded_args(args, ROOT),
              "steps": step, "total_steps": total}
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shipped = load_fashion_vit(args.out)
    config["test_accuracy"] = accuracy(shipped, test_x, test_y)
    config["test_images"] = len(test_x)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out}: test accuracy {config['test_accuracy']:.4f} on {len(test_x)} images", flush=True)
    if args.out.resolve() == (ROOT / "assets" / "fashion-vit").resolve() and step == total:
        params = sum(p.numel() for p in shipped.parameters())
        command = " ".join(["`python scripts/train_fashion_vit.py"] + sys.argv[1:]) + "`"
        stage, commands = "Trained ", command
        if args.init_from:  # a second stage: name the first one too
            stage = ("Trained in two stages: `python scripts/train_fashion_vit.py` (4 epochs, lr 1e-3), then "
                     "from its weights ")
            commands = f"`python scripts/train_fashion_vit.py`, then {command}"
        replace_section(ROOT / "docs" / "models.md", "fashion-vit", (
            f"**fashion-vit**: timm `VisionTransformer` ({params / 1e6:.2f}M parameters: width "
            f"{FASHION_VIT_ARGS['embed_dim']}, {FASHION_VIT_ARGS['depth']} blocks, 4x4 patches of 28x28 grey "
            f"images = 49 patch tokens + CLS). {stage}{args.epochs} epochs on the 60,000 training images "
            f"(AdamW lr {args.lr}, batch {args.batch_size}, warm-up + cosine, label smoothing "
            f"{args.label_smoothing}, drop-path {args.drop_path}, shift/flip augmentation, seed {args.seed}). "
            f"Shipped fp16: `assets/fashion-vit/`.\n\n"
            f"Top-1 accuracy on the full Fashion-MNIST test set ({len(test_x)} images), measured on the "
            f"shipped weights: **{config['test_accuracy']:.4f}** (bar: 0.85).\n\n"
            f"Commands: {commands}"))


if __name__ == "__main__":
    main()
