"""Train the UNet of the built-in text-to-image pipeline and save the whole StableDiffusionPipeline.

    python scripts/train_fashion_sd.py                    # needs assets/fashion-clip and the VAE from
                                                          # scripts/train_fashion_vae.py; writes assets/fashion-sd/
    python scripts/train_fashion_sd.py --max-steps 3 ...  # a smoke run (tests)

Latent diffusion (Rombach et al., 2022): the frozen autoencoder's latents (times its scaling
factor) are noised with Stable Diffusion's schedule and the UNet predicts the noise, conditioned
on the frozen fashion-clip text tower's hidden states of a caption; 10% of captions are replaced
by the empty prompt so classifier-free guidance works (Ho & Salimans, 2022). At the end the
pipeline generates images for every class at 20 steps and the fashion-vit classifier checks them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import replace_section  # noqa: E402
from accel.pipelines.data import FASHION_CLASSES, load_fashion_mnist  # noqa: E402
from accel.pipelines.fashion_clip import CAPTION_TEMPLATES, MAX_TOKENS, load_fashion_clip  # noqa: E402
from accel.pipelines.fashion_sd import (  # noqa: E402
    assemble_pipeline, build_unet, encode_latents, load_fashion_sd, training_noise, write_generation_metrics,
)
from accel.pipelines.fashion_vit import load_fashion_vit  # noqa: E402
from accel.pipelines.tokenizer import write_vocab_files  # noqa: E402
from accel.pipelines.training import add_training_args, batch_indices, step_generator, train_loop  # noqa: E402


def text_tower(clip_dir):
    """fashion-clip's text tower as a standalone ``CLIPTextModel`` and its tokenizer."""
    from transformers import CLIPTextModel

    clip, processor = load_fashion_clip(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval().requires_grad_(False), processor.tokenizer


@torch.inference_mode()
def encode_prompts(text_encoder, tokenizer, prompts):
    """The hidden states the pipeline computes for ``prompts``: ``[P, 16, width]``."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, epochs=2, batch_size=64, lr=1e-3, weight_decay=0.01, warmup_steps=100,
                      work_dir=ROOT / ".train" / "fashion-sd")
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--clip", type=Path, default=ROOT / "assets" / "fashion-clip")
    parser.add_argument("--vae", type=Path, default=ROOT / ".train" / "fashion-vae" / "vae")
    parser.add_argument("--classifier", type=Path, default=ROOT / "assets" / "fashion-vit")
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-sd")
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    text_encoder, tokenizer = text_tower(args.clip)
    latents = encode_latents(vae, train_x)  # the frozen parts run once, up front
    with torch.inference_mode():
        captions = [[t.format(name) for t in CAPTION_TEMPLATES] for name in FASHION_CLASSES]
        caption_states = torch.stack([encode_prompts(text_encoder, tokenizer, c) for c in captions])  # [10, T, L, W]
        empty_state = encode_prompts(text_encoder, tokenizer, [""])[0]
    noised = training_noise()

    torch.manual_seed(args.seed)
    unet = build_unet(cross_attention_dim=text_encoder.config.hidden_size)

    def loss_at(step: int) -> torch.Tensor:
        _, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        gen = step_generator(args.seed, step)
        templates = torch.randint(0, len(CAPTION_TEMPLATES), (len(idx),), generator=gen)
        states = caption_states[train_y[idx], templates].clone()
        states[torch.rand(len(idx), generator=gen) < args.uncond_prob] = empty_state
        noisy, noise, t = noised(latents[idx], gen)
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        return F.mse_loss(pred, noise)

    step, total = train_loop(unet, loss_at, num_items=len(train_x), args=args)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet.eval())
    pipe.save_pretrained(args.out)
    write_vocab_files(tokenizer, args.out / "tokenizer")
    metrics = write_generation_metrics(
        args.out, load_fashion_sd(args.out), load_fashion_vit(args.classifier), args.eval_per_class, args.eval_steps,
        args.guidance, args.seed, steps=step, total_steps=total,
        unet_parameters=sum(p.numel() for p in unet.parameters()))
    accuracy = metrics["generated_class_accuracy"]
    if args.out.resolve() == (ROOT / "assets" / "fashion-sd").resolve() and step == total:
        replace_section(ROOT / "docs" / "models.md", "fashion-sd", (
            f"**fashion-sd**: diffusers `StableDiffusionPipeline` (AutoencoderKL 1x32x32 <-> 4x16x16, "
            f"fashion-clip's text tower and tokenizer, UNet2DConditionModel of "
            f"{metrics['unet_parameters'] / 1e6:.2f}M parameters with cross-attention at 16x16 and 8x8, DDIM). "
            f"UNet trained {args.epochs} epochs (AdamW lr {args.lr}, batch {args.batch_size}, "
            f"{args.uncond_prob:.0%} empty prompts, seed {args.seed}).\n\n"
            f"At {args.eval_steps} steps, guidance {args.guidance}, fashion-vit classifies "
            f"**{accuracy:.3f}** of {metrics['images']} generated images as the prompted class (bar: 0.70).\n\n"
            f"Commands: `python scripts/train_fashion_vae.py && python scripts/train_fashion_sd.py`"))


if __name__ == "__main__":
    main()
