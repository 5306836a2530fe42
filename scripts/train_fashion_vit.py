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
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.pipelines.data import load_fashion_mnist  # noqa: E402
from accel.pipelines.training import Checkpoint, augment, batch_indices, make_optimizer, step_generator  # noqa: E402
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
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: auto)")
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".train" / "fashion-vit")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-vit")
    args = parser.parse_args()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root)
    if args.train_limit:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]
    if args.eval_limit:
        test_x, test_y = test_x[: args.eval_limit], test_y[: args.eval_limit]

    torch.manual_seed(args.seed)
    model = build_fashion_vit(drop_path_rate=args.drop_path)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = args.epochs * steps_per_epoch
    optimizer, scheduler = make_optimizer(model, args.lr, args.weight_decay, args.warmup_steps, total)
    checkpoint = Checkpoint(args.work_dir / "checkpoint.pt", model, optimizer, scheduler)
    step = checkpoint.resume()

    stop = min(total, args.max_steps) if args.max_steps else total
    start_time, losses = time.time(), []
    while step < stop:
        model.train()
        epoch, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        x = augment(preprocess(train_x[idx]), step_generator(args.seed, step))
        loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.item())
        if step % 50 == 0 or step == stop:
            rate = (time.time() - start_time) / len(losses)
            print(f"step {step}/{total} epoch {epoch} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.2f}s/step", flush=True)
        if step % args.checkpoint_every == 0 or step == stop:
            checkpoint.save(step, {"args": {k: str(v) for k, v in vars(args).items()}})
        if step % steps_per_epoch == 0:
            print(f"epoch {epoch} done: test accuracy {accuracy(model, test_x, test_y):.4f}", flush=True)

    if step < total:
        print(f"stopped at step {step}/{total} (--max-steps); rerun to resume", flush=True)
    # Ship fp16 weights; the figures below are measured on them after reloading.
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(args.out / "model.safetensors"))
    config = {"model_args": FASHION_VIT_ARGS, "train": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()},
              "steps": step, "total_steps": total}
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shipped = load_fashion_vit(args.out)
    config["test_accuracy"] = accuracy(shipped, test_x, test_y)
    config["test_images"] = len(test_x)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out}: test accuracy {config['test_accuracy']:.4f} on {len(test_x)} images", flush=True)


if __name__ == "__main__":
    main()
