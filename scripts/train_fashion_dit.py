"""Train the transformer of the built-in class-conditional pipeline and save the whole DiTPipeline.

    python scripts/train_fashion_dit.py                    # needs assets/fashion-sd (its autoencoder);
                                                           # writes assets/fashion-dit/
    python scripts/train_fashion_dit.py --max-steps 3 ...  # a smoke run (tests)

Latent diffusion with a Diffusion Transformer (Peebles & Xie, 2023): fashion-sd's frozen
autoencoder gives the latents (times its scaling factor), noised with Stable Diffusion's schedule;
the transformer predicts the noise from the noisy latent, the timestep and the class. 10% of
labels are replaced by the null class 1000 (the id DiTPipeline uses for the unconditional half of
classifier-free guidance), the same id in every block: diffusers' own per-block label dropout is
switched off while training so the blocks agree. At the end the pipeline generates images for
every class at 20 steps and the fashion-vit classifier checks them.
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
from accel.pipelines.data import load_fashion_mnist  # noqa: E402
from accel.pipelines.fashion_dit import (  # noqa: E402
    NULL_CLASS, assemble_dit_pipeline, build_transformer, load_fashion_dit, save_dit_pipeline,
)
from accel.pipelines.fashion_sd import encode_latents, training_noise, write_generation_metrics  # noqa: E402
from accel.pipelines.fashion_vit import load_fashion_vit  # noqa: E402
from accel.pipelines.training import add_training_args, batch_indices, step_generator, train_loop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, epochs=4, batch_size=128, lr=6e-4, weight_decay=0.0, warmup_steps=200,
                      work_dir=ROOT / ".train" / "fashion-dit")
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--vae", type=Path, default=ROOT / "assets" / "fashion-sd" / "vae")
    parser.add_argument("--classifier", type=Path, default=ROOT / "assets" / "fashion-vit")
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "fashion-dit")
    args = parser.parse_args()

    from diffusers import AutoencoderKL
    from diffusers.models.embeddings import LabelEmbedding

    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    latents = encode_latents(vae, train_x)  # the frozen autoencoder runs once, up front
    noised = training_noise()

    torch.manual_seed(args.seed)
    transformer = build_transformer()
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # dropped once per image below, not independently per block

    def loss_at(step: int) -> torch.Tensor:
        _, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        gen = step_generator(args.seed, step)
        labels = train_y[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < args.uncond_prob] = NULL_CLASS
        noisy, noise, t = noised(latents[idx], gen)
        pred = transformer(noisy, timestep=t, class_labels=labels).sample
        return F.mse_loss(pred, noise)

    step, total = train_loop(transformer, loss_at, num_items=len(train_x), args=args)
    pipe = assemble_dit_pipeline(transformer.eval(), vae)
    save_dit_pipeline(pipe, args.out)
    metrics = write_generation_metrics(
        args.out, load_fashion_dit(args.out), load_fashion_vit(args.classifier), args.eval_per_class, args.eval_steps,
        args.guidance, args.seed, steps=step, total_steps=total,
        transformer_parameters=sum(p.numel() for p in transformer.parameters()))
    accuracy = metrics["generated_class_accuracy"]
    if args.out.resolve() == (ROOT / "assets" / "fashion-dit").resolve() and step == total:
        replace_section(ROOT / "docs" / "models.md", "fashion-dit", (
            f"**fashion-dit**: diffusers `DiTPipeline` (DiTTransformer2DModel of "
            f"{metrics['transformer_parameters'] / 1e6:.2f}M parameters: 8 adaLN-Zero blocks of width 128, "
            f"2x2 patches of 4x16x16 latents = 64 tokens, label tables of 1001 rows with id 1000 the null class; "
            f"fashion-sd's autoencoder; DDIM). Trained {args.epochs} epochs (AdamW lr {args.lr}, batch "
            f"{args.batch_size}, {args.uncond_prob:.0%} null labels, seed {args.seed}). `assets/fashion-dit/`, "
            f"loadable with `DiTPipeline.from_pretrained`; call it with `class_labels`.\n\n"
            f"At {args.eval_steps} steps, guidance {args.guidance}, fashion-vit classifies "
            f"**{accuracy:.3f}** of {metrics['images']} generated images as the requested class (bar: 0.70).\n\n"
            f"Command: `python scripts/train_fashion_dit.py`"))


if __name__ == "__main__":
    main()
