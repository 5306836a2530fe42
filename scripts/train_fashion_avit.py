"""Fine-tune the built-in fashion-vit for A-ViT token halting; seeded and resumable.

    python scripts/train_fashion_avit.py --device cuda      # full run: writes assets/fashion-vit-avit/
    python scripts/train_fashion_avit.py --max-steps 3 ...  # a smoke run

Starts from ``assets/fashion-vit`` and trains all weights with cross-entropy + ponder loss + KL
toward a Gaussian prior over halting depth (``accel.avit.training_loss``), the halted tokens
masked out of attention (static shapes); with --distill-weight, also distilled toward the
unpatched fashion-vit's predictions. --holdout keeps the last N training images out of the
fine-tune and records the accuracy and depth on them, to choose settings without the test
split. Batches and augmentation are seeded per step and a checkpoint goes to --work-dir
(accel.pipelines.training), so rerunning resumes. --device cuda trains on a GPU. Writes the
backbone as a plain timm state dict (fp16 ``model.safetensors``), the halting parameters apart
(``halting.safetensors``, ``accel.avit.save``) and ``config.json`` with the metrics measured on
the shipped files with real token removal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402
from accel.api import get_patch  # noqa: E402
from accel.pipelines.data import load_fashion_mnist, load_test_subset  # noqa: E402
from accel.pipelines.fashion_avit import load_fashion_avit  # noqa: E402
from accel.pipelines.fashion_vit import FASHION_VIT_ARGS, FASHION_VIT_DIR, load_fashion_vit, preprocess  # noqa: E402
from accel.pipelines.training import (  # noqa: E402
    add_training_args, augment, batch_indices, recorded_args, step_generator, train_loop,
)

SUBSET_SLICE = 500  # images of the shipped test subset whose accuracy the tests check


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> dict:
    """Top-1 accuracy and mean patch-token depth of ``model`` (patched with avit or not)."""
    model.eval()
    correct, depth, computed = 0, 0.0, 0
    patch = get_patch(model, "avit")
    for start in range(0, len(images), batch):
        logits = model(preprocess(images[start:start + batch]))
        correct += int((logits.argmax(-1) == labels[start:start + batch]).sum())
        if patch is not None:
            last = patch.last_call()
            depth += last["mean_depth"] * len(logits)
            computed += sum(last["computed_tokens"])
    out = {"accuracy": correct / len(images), "images": len(images)}
    if patch is not None:
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        out["mean_depth"] = depth / len(images)
        out["computed_fraction"] = computed / (len(images) * len(model.blocks) * tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, epochs=5, batch_size=128, lr=2e-4, weight_decay=0.05, warmup_steps=30,
                      work_dir=ROOT / ".train" / "fashion-vit-avit")
    parser.add_argument("--gamma", type=float, default=5.0)
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--ponder-weight", type=float, default=5e-3)
    parser.add_argument("--kl-weight", type=float, default=0.1)
    parser.add_argument("--prior-mean", type=float, default=5.0)
    parser.add_argument("--prior-std", type=float, default=2.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--distill-weight", type=float, default=1.0,
                        help="weight of the distillation toward the unpatched fashion-vit (0: none)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="keep the last N training images out of the fine-tune; report metrics on them")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the shipped asset records which)")
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-vit-avit")
    args = parser.parse_args()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root, limit=args.train_limit)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root, limit=args.eval_limit)
    if not 0 <= args.holdout < len(train_x):
        parser.error(f"--holdout must be in [0, {len(train_x)}); got {args.holdout}")
    split = len(train_x) - args.holdout
    (train_x, held_x), (train_y, held_y) = train_x.tensor_split([split]), train_y.tensor_split([split])

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_fashion_vit().to(device)
    teacher = load_fashion_vit().to(device) if args.distill_weight else None
    config = accel.AViT(gamma=args.gamma, beta=args.beta, eps=args.eps)
    prior = accel.avit.gaussian_prior(len(model.blocks), args.prior_mean, args.prior_std).to(device)
    accel.patch(model, avit=accel.AViT(gamma=args.gamma, beta=args.beta, eps=args.eps, mode="mask"))
    recent = []

    def loss_at(step: int) -> torch.Tensor:
        _, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        x = augment(preprocess(train_x[idx]), step_generator(args.seed, step)).to(device)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
        loss, parts = accel.avit.training_loss(model, model(x), train_y[idx].to(device), prior=prior,
                                               ponder_weight=args.ponder_weight, kl_weight=args.kl_weight,
                                               label_smoothing=args.label_smoothing, teacher_logits=teacher_logits,
                                               distill_weight=args.distill_weight, temperature=args.temperature)
        recent.append(parts)
        if len(recent) == 25:
            print("  " + " ".join(f"{k} {sum(float(p[k]) for p in recent) / 25:.4f}" for k in parts), flush=True)
            recent.clear()
        return loss

    start = time.time()
    step, total = train_loop(model, loss_at, num_items=len(train_x), args=args, log_every=25)
    train_seconds = time.time() - start
    accel.unpatch(model)

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()},
              str(args.out / "model.safetensors"))
    accel.avit.save(args.out / "halting.safetensors", config,
                    metadata={"trained_by": "scripts/train_fashion_avit.py", "steps": str(step)})
    meta = {"model_args": FASHION_VIT_ARGS, "base": str(FASHION_VIT_DIR.relative_to(ROOT)),
            "halting": {"gamma": config.gamma, "beta": config.beta, "eps": config.eps},
            "train": recorded_args(args, ROOT), "steps": step, "total_steps": total,
            "trained_on": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "train_seconds_this_run": round(train_seconds, 1)}
    (args.out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    # Figures measured on the shipped files (fp16 weights reloaded, on the CPU as the tests run),
    # with real token removal.
    shipped, halting = load_fashion_avit(args.out)
    base_accuracy = json.loads((FASHION_VIT_DIR / "config.json").read_text()).get("test_accuracy")
    no_halting = evaluate(shipped, test_x, test_y)["accuracy"]
    accel.patch(shipped, avit=halting)
    test = evaluate(shipped, test_x, test_y)
    sub_x, sub_y = load_test_subset()
    subset = evaluate(shipped, sub_x[:SUBSET_SLICE], sub_y[:SUBSET_SLICE])
    meta["metrics"] = {
        "test_accuracy": test["accuracy"], "test_images": test["images"], "mean_depth": test["mean_depth"],
        "computed_token_fraction": test["computed_fraction"], "test_accuracy_without_halting": no_halting,
        "base_fashion_vit_test_accuracy": base_accuracy,
        "subset_slice": {"images": SUBSET_SLICE, "accuracy": subset["accuracy"], "mean_depth": subset["mean_depth"]},
    }
    if args.holdout:
        # fashion-vit itself was trained on these images: compare settings, not with the test split
        held = evaluate(shipped, held_x, held_y)
        meta["metrics"]["holdout"] = {"images": held["images"], "accuracy": held["accuracy"],
                                      "mean_depth": held["mean_depth"],
                                      "base_fashion_vit_accuracy": evaluate(load_fashion_vit(), held_x, held_y)["accuracy"]}
    (args.out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}: {json.dumps(meta['metrics'])}", flush=True)


if __name__ == "__main__":
    main()
