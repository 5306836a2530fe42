"""Train early-exit heads for the built-in fashion-vit and calibrate their thresholds; seeded.

    python scripts/train_exit_heads.py                       # writes assets/fashion-vit-exits/
    python scripts/train_exit_heads.py --train-limit 512 --held-out 256 --epochs 1 --out /tmp/x  # smoke run

The backbone stays frozen (accel.early_exit.fit_heads: self-distillation from its own head on the
training images minus a seeded held-out part). Thresholds are calibrated on that held-out part of
the training split, never on the test set (accel.early_exit.calibrate_heads). The figures on the
shipped test subset are measured afterwards, for the record, and stored in exit_heads.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402
from accel.pipelines import load, load_fashion_mnist, load_test_subset  # noqa: E402
from accel.pipelines.fashion_vit import preprocess  # noqa: E402
from accel.pipelines.training import recorded_args  # noqa: E402

SLICE_STEP = 4  # every 4th image of the test subset: the slice the test checks
SWEEP = (0.0025, 0.005, 0.01, 0.02, 0.04)  # held-out accuracy budgets also calibrated (metrics only)


@torch.inference_mode()
def measure(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500):
    """(top-1 accuracy, mean blocks computed per image) of ``model`` (patched or not)."""
    correct, depth = 0, 0.0
    patched = accel.api.get_patch(model, "early_exit") is not None
    for start in range(0, len(images), batch):
        logits = model(preprocess(images[start:start + batch]))
        correct += (logits.argmax(-1) == labels[start:start + batch]).sum().item()
        depth += accel.early_exit.exit_depths(model).sum().item() if patched else len(model.blocks) * len(logits)
    return correct / len(images), depth / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="1,2,3,4,5,6,7,8,9,10",
                        help="0-based indices of the blocks to exit after (fashion-vit has 12)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width of the exit heads (0: LayerNorm + Linear)")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the cached backbone features")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--label-weight", type=float, default=0.0)
    parser.add_argument("--held-out", type=int, default=10000, help="training images kept apart for calibration")
    parser.add_argument("--max-drop", type=float, default=0.005, help="accuracy lost vs the final head, held-out")
    parser.add_argument("--criterion", choices=accel.early_exit.CRITERIA, default="max_prob")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: auto)")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-vit-exits")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]

    start = time.time()
    torch.manual_seed(args.seed)
    model = load("fashion-vit")
    images, labels = load_fashion_mnist("train", root=args.data_root, limit=args.train_limit)
    if not 0 < args.held_out < len(images):
        raise SystemExit(f"--held-out must be between 1 and {len(images) - 1}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, fit = order[: args.held_out], order[args.held_out:]

    heads = accel.early_exit.fit_heads(
        model, (preprocess(images[fit]), labels[fit]), blocks, epochs=args.epochs, lr=args.lr,
        temperature=args.temperature, label_weight=args.label_weight, batch_size=args.batch_size,
        hidden=args.hidden, seed=args.seed, log_every=500)
    print(f"heads trained in {time.time() - start:.0f}s: {heads.metrics['fit']}", flush=True)
    ee = accel.early_exit
    exit_logits, final, held_labels = ee.exit_outputs(model, heads, (preprocess(images[held]), labels[held]))
    sweep = {}  # thresholds for other budgets, for benchmarks that trade accuracy for speed
    for max_drop in sorted(set(SWEEP) | {args.max_drop}):
        cal = ee.calibrate(exit_logits, final, held_labels, depths=heads.depths, final_depth=len(model.blocks),
                           max_drop=max_drop, criterion=args.criterion)
        sweep[str(max_drop)] = {"thresholds": cal.thresholds, "drop": cal.drop, "mean_depth": cal.mean_depth}
        print(f"max_drop {max_drop}: held-out drop {cal.drop:.4f}, mean depth {cal.mean_depth:.2f}, thresholds "
              f"{[round(t, 4) for t in cal.thresholds]}", flush=True)
        if max_drop == args.max_drop:
            ee.store_calibration(heads, cal, max_drop, len(held))
    heads.metrics["calibration_sweep"] = sweep

    test_x, test_y = load_test_subset()
    base_acc, _ = measure(model, test_x, test_y)
    accel.patch(model, early_exit=heads)
    acc, depth = measure(model, test_x, test_y)
    # the slice tests/patches/test_early_exit.py checks, in one batch as the test runs it
    slice_x, slice_y = test_x[::SLICE_STEP], test_y[::SLICE_STEP]
    slice_acc, slice_depth = measure(model, slice_x, slice_y, batch=len(slice_x))
    accel.unpatch(model)
    slice_base, _ = measure(model, slice_x, slice_y, batch=len(slice_x))
    heads.metrics["test_subset"] = {"images": len(test_x), "unpatched_accuracy": base_acc, "accuracy": acc,
                                    "drop": base_acc - acc, "mean_depth": depth, "depth": len(model.blocks)}
    heads.metrics["test_subset_slice"] = {"step": SLICE_STEP, "images": len(slice_x), "accuracy": slice_acc,
                                          "unpatched_accuracy": slice_base, "mean_depth": slice_depth}
    heads.metrics["train"] = recorded_args(args, ROOT)
    heads.metrics["train"]["seconds"] = round(time.time() - start)
    accel.early_exit.save_heads(args.out, heads)
    print(f"test subset ({len(test_x)} images): accuracy {base_acc:.4f} -> {acc:.4f}, mean depth {depth:.2f} of "
          f"{len(model.blocks)} blocks; wrote {args.out} in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
