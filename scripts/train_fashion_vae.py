"""Train the autoencoder (diffusers AutoencoderKL) of the built-in text-to-image pipeline.

    python scripts/train_fashion_vae.py                    # writes .train/fashion-vae/vae (used by train_fashion_sd.py)
    python scripts/train_fashion_vae.py --max-steps 3 ...  # a smoke run (tests)

Loss: mean squared reconstruction error plus a small KL term toward N(0, I) (Kingma & Welling,
2014; the latent-diffusion recipe without its adversarial and perceptual terms, which 28x28
grey images do not need). Afterwards ``scaling_factor`` is set to 1/std of the training latents,
as Stable Diffusion does, so the diffusion model sees unit-variance latents.
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

from accel.pipelines.data import load_fashion_mnist  # noqa: E402
from accel.pipelines.fashion_sd import build_vae, to_vae_range  # noqa: E402
from accel.pipelines.training import add_training_args, batch_indices, step_generator, train_loop  # noqa: E402


@torch.inference_mode()
def reconstruction_psnr(vae, images: torch.Tensor, batch: int = 500) -> float:
    """PSNR (dB) of decode(encode(x)) against x in [-1, 1] (peak-to-peak 2)."""
    vae.eval()
    errors = []
    for start in range(0, len(images), batch):
        x = to_vae_range(images[start:start + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        errors.append(F.mse_loss(recon, x, reduction="none").mean(dim=(1, 2, 3)))
    mse = torch.cat(errors).mean().item()
    return 10 * math.log10(4.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, epochs=1, batch_size=128, lr=1e-3, weight_decay=0.0, warmup_steps=50,
                      work_dir=ROOT / ".train" / "fashion-vae")
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--eval-limit", type=int, default=2000)
    args = parser.parse_args()

    train_x, _ = load_fashion_mnist("train", root=args.data_root)
    test_x, _ = load_fashion_mnist("test", root=args.data_root)
    test_x = test_x[: args.eval_limit]
    torch.manual_seed(args.seed)
    vae = build_vae()

    def loss_at(step: int) -> torch.Tensor:
        _, idx = batch_indices(len(train_x), args.batch_size, args.seed, step)
        x = to_vae_range(train_x[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=step_generator(args.seed, step))).sample
        return F.mse_loss(recon, x) + args.kl_weight * posterior.kl().mean()

    step, total = train_loop(vae, loss_at, num_items=len(train_x), args=args, clip_grad=None)

    vae.eval()
    with torch.inference_mode():
        sample = to_vae_range(train_x[:5000])
        latents = torch.cat([vae.encode(sample[i:i + 500]).latent_dist.mode() for i in range(0, len(sample), 500)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    out = args.work_dir / "vae"
    vae.save_pretrained(out)
    metrics = {"reconstruction_psnr_db": reconstruction_psnr(vae, test_x), "test_images": len(test_x),
               "scaling_factor": vae.config.scaling_factor, "steps": step, "total_steps": total}
    (args.work_dir / "vae_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out}: {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
