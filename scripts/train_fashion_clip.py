"""Train the built-in CLIP model (transformers CLIPModel) on Fashion-MNIST images and captions.

    python scripts/train_fashion_clip.py                    # full run: writes assets/fashion-clip/
    python scripts/train_fashion_clip.py --max-steps 3 ...  # a smoke run (tests)

Contrastive training (Radford et al., 2021) adapted to a caption set with only ten classes:
in every batch the text side is one caption per class (templates drawn per step), the image
loss is cross-entropy over those captions, and the text loss spreads its target uniformly over
the batch's images of that class (they are all true pairs, so none is treated as a negative).
Seeded and resumable like every training script here (accel.pipelines.training).
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

from accel.pipelines.data import FASHION_CLASSES, load_fashion_mnist  # noqa: E402
from accel.pipelines.fashion_clip import (  # noqa: E402
    CAPTION_TEMPLATES, MAX_TOKENS, build_fashion_clip, build_processor, load_fashion_clip, pixel_values,
    zero_shot_logits,
)
from accel.pipelines.tokenizer import write_vocab_files  # noqa: E402
from accel.pipelines.training import Checkpoint, augment, batch_indices, make_optimizer, step_generator  # noqa: E402


def zero_shot_accuracy(model, tokenizer, images, labels, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = zero_shot_logits(model, tokenizer, images[start:start + batch])
        correct += (logits.argmax(-1) == labels[start:start + batch]).sum().item()
    return correct / len(images)


def clip_loss(model, tokenizer, x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    picks = torch.randint(0, len(CAPTION_TEMPLATES), (len(FASHION_CLASSES),), generator=gen)
    captions = [CAPTION_TEMPLATES[t].format(name) for t, name in zip(picks.tolist(), FASHION_CLASSES)]
    text = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=x)
    logits = out.logits_per_image  # [B, 10], already scaled by the learnt temperature
    image_loss = F.cross_entropy(logits, labels)
    present = torch.bincount(labels, minlength=len(FASHION_CLASSES)) > 0
    targets = F.one_hot(labels, len(FASHION_CLASSES)).T.float()[present]  # [classes present, B]
    targets = targets / targets.sum(dim=1, keepdim=True)
    text_loss = -(targets * F.log_softmax(logits.T[present], dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: auto)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".train" / "fashion-clip")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-clip")
    args = parser.parse_args()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root)
    if args.eval_limit:
        test_x, test_y = test_x[: args.eval_limit], test_y[: args.eval_limit]

    processor = build_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(args.seed)
    model = build_fashion_clip(vocab_size=len(tokenizer))
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
        gen = step_generator(args.seed, step)
        loss = clip_loss(model, tokenizer, augment(pixel_values(train_x[idx]), gen), train_y[idx], gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (Sec. 2.5 of the paper)
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        if step % 25 == 0 or step == stop:
            rate = (time.time() - start_time) / len(losses)
            print(f"step {step}/{total} epoch {epoch} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"{rate:.2f}s/step", flush=True)
        if step % args.checkpoint_every == 0 or step == stop:
            checkpoint.save(step)
        if step % steps_per_epoch == 0:
            print(f"epoch {epoch} done: zero-shot accuracy "
                  f"{zero_shot_accuracy(model, tokenizer, test_x, test_y):.4f}", flush=True)

    if step < total:
        print(f"stopped at step {step}/{total} (--max-steps); rerun to resume", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(args.out)
    processor.save_pretrained(args.out)
    write_vocab_files(tokenizer, args.out)
    shipped, shipped_processor = load_fashion_clip(args.out)
    metrics = {"zero_shot_accuracy": zero_shot_accuracy(shipped, shipped_processor.tokenizer, test_x, test_y),
               "test_images": len(test_x), "steps": step, "total_steps": total,
               "train": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {args.out}: zero-shot accuracy {metrics['zero_shot_accuracy']:.4f} on {len(test_x)} images",
          flush=True)


if __name__ == "__main__":
    main()
