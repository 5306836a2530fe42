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
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import replace_section  # noqa: E402
from accel.pipelines.data import FASHION_CLASSES, load_fashion_mnist  # noqa: E402
from accel.pipelines.fashion_clip import (  # noqa: E402
    CAPTION_TEMPLATES, MAX_TOKENS, build_fashion_clip, build_processor, load_fashion_clip, pixel_values,
    zero_shot_logits,
)
from accel.pipelines.tokenizer import write_vocab_files  # noqa: E402
from accel.pipelines.training import (  # noqa: E402
    add_training_args, augment, batch_indices, recorded_args, step_generator, train_loop,
)


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
    add_training_args(parser, epochs=2, batch_size=256, lr=5e-4, weight_decay=0.1, warmup_steps=50,
                      work_dir=ROOT / ".train" / "fashion-clip", checkpoint_every=50)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-clip")
    args = parser.parse_args()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root, limit=args.eval_limit)

    processor = build_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(args.seed)
    model = build_fashion_clip(vocab_size=len(tokenizer))

    def loss_at(step: int) -> torch.Tensor:
        _, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        gen = step_generator(args.seed, step)
        return clip_loss(model, tokenizer, augment(pixel_values(train_x[idx]), gen), train_y[idx], gen)

    def clamp_temperature() -> None:
        with torch.no_grad():  # CLIP clamps the temperature at 100 (Sec. 2.5 of the paper)
            model.logit_scale.clamp_(0, math.log(100))

    def after_epoch(epoch: int) -> None:
        print(f"epoch {epoch} done: zero-shot accuracy "
              f"{zero_shot_accuracy(model, tokenizer, test_x, test_y):.4f}", flush=True)

    step, total = train_loop(model, loss_at, num_items=len(train_x), args=args, after_step=clamp_temperature,
                             after_epoch=after_epoch, log_every=25)
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(args.out)
    processor.save_pretrained(args.out)
    write_vocab_files(tokenizer, args.out)
    shipped, shipped_processor = load_fashion_clip(args.out)
    metrics = {"zero_shot_accuracy": zero_shot_accuracy(shipped, shipped_processor.tokenizer, test_x, test_y),
               "test_images": len(test_x), "steps": step, "total_steps": total,
               "train": recorded_args(args, ROOT)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {args.out}: zero-shot accuracy {metrics['zero_shot_accuracy']:.4f} on {len(test_x)} images",
          flush=True)
    if args.out.resolve() == (ROOT / "assets" / "fashion-clip").resolve() and step == total:
        params = sum(p.numel() for p in shipped.parameters())
        replace_section(ROOT / "docs" / "models.md", "fashion-clip", (
            f"**fashion-clip**: transformers `CLIPModel` ({params / 1e6:.2f}M parameters: text and vision "
            f"towers of width 128 and 4 layers, 4x4 patches, projection 64) with its `CLIPProcessor` "
            f"(own BPE vocabulary of {len(tokenizer)} tokens learnt from the captions; grey images "
            f"converted to RGB). Trained {args.epochs} epochs contrastively on the 60,000 training images "
            f"with captions from {len(CAPTION_TEMPLATES)} templates (AdamW lr {args.lr}, batch "
            f"{args.batch_size}, seed {args.seed}). `assets/fashion-clip/`.\n\n"
            f"Zero-shot accuracy with the prompts \"a photo of a {{name}}\" on the full test set "
            f"({len(test_x)} images), measured on the shipped weights: **{metrics['zero_shot_accuracy']:.4f}** "
            f"(bar: 0.75).\n\nCommand: `python scripts/train_fashion_clip.py`"))


if __name__ == "__main__":
    main()
