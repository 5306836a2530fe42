"""The built-in text-to-image pipeline: a diffusers ``StableDiffusionPipeline`` of standard parts.

- ``AutoencoderKL``: 1-channel 32x32 images (Fashion-MNIST padded by 2 pixels) <-> 4x16x16 latents.
- ``CLIPTextModel`` + ``CLIPTokenizer``: the text tower and vocabulary of ``fashion-clip``.
- ``UNet2DConditionModel``: cross-attention transformer blocks at 16x16 and 8x8 (and the mid block).
- ``DDIMScheduler``.

Made by ``scripts/train_fashion_vae.py`` then ``scripts/train_fashion_sd.py``; saved with
``save_pretrained`` in ``assets/fashion-sd`` and loadable with ``StableDiffusionPipeline.from_pretrained``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from .data import ASSETS, FASHION_CLASSES, prompt_for

__all__ = ["IMAGE_SIZE", "PAD", "to_vae_range", "from_vae_range", "pipeline_images", "build_vae", "build_unet",
           "noise_scheduler_config", "encode_latents", "training_noise", "assemble_pipeline", "load_fashion_sd",
           "generate", "generated_class_accuracy", "write_generation_metrics"]

FASHION_SD_DIR = ASSETS / "fashion-sd"
IMAGE_SIZE, PAD = 32, 2  # 28x28 padded to a size the autoencoder halves cleanly


def to_vae_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 32, 32]`` in [-1, 1], background padded."""
    x = images.unsqueeze(1).float() / 127.5 - 1.0
    return F.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)


def from_vae_range(x: torch.Tensor) -> torch.Tensor:
    """float ``[N, 1, 32, 32]`` in [-1, 1] -> uint8 ``[N, 28, 28]`` (the padding cropped)."""
    x = x[:, 0, PAD:IMAGE_SIZE - PAD, PAD:IMAGE_SIZE - PAD]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pipeline_images(images: torch.Tensor) -> torch.Tensor:
    """A built-in pipeline's ``output_type="pt"`` images, float ``[N, 1, 32, 32]`` in [0, 1] ->
    uint8 ``[N, 28, 28]``: the ``postprocess`` that ``accel eval`` and the demo give these pipelines."""
    return from_vae_range(images * 2 - 1)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    )


def build_unet(cross_attention_dim: int = 128):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96), layers_per_block=1, norm_num_groups=16,
        # diffusers' legacy name: ``attention_head_dim`` is the number of heads per level (32-dim heads at 8x8)
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 3),
    )


def noise_scheduler_config() -> Dict[str, Any]:
    """Stable Diffusion's noise schedule (scaled-linear betas), epsilon prediction."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@torch.inference_mode()
def encode_latents(vae: Any, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> the frozen autoencoder's latents times its scaling factor, ``[N, 4, 16, 16]``."""
    latents = [vae.encode(to_vae_range(images[i:i + batch])).latent_dist.mode() for i in range(0, len(images), batch)]
    return torch.cat(latents) * vae.config.scaling_factor


def training_noise():
    """A function ``(z0, generator) -> (noisy latents, noise, timesteps)``: Stable Diffusion's
    schedule at uniformly drawn training timesteps (Ho et al., 2020, Alg. 1)."""
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler(**{k: v for k, v in noise_scheduler_config().items() if k != "set_alpha_to_one"})

    def noised(z0: torch.Tensor, gen: torch.Generator):
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(z0),), generator=gen)
        return schedule.add_noise(z0, noise, t), noise, t

    return noised


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**noise_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def load_fashion_sd(folder: Optional[Path] = None):
    """The trained ``StableDiffusionPipeline``, fp32, CPU, offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder or FASHION_SD_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def generate(pipe: Any, labels: torch.Tensor, steps: int, guidance: float, seed: int = 0,
             batch: int = 50) -> torch.Tensor:
    """Images of the classes ``labels`` from a built-in pipeline, uint8 ``[N, 28, 28]``.

    A ``StableDiffusionPipeline`` gets the prompts "a photo of a {name}", a ``DiTPipeline`` the
    class ids; batch ``i`` is drawn with generator seed ``seed + i * batch``.
    """
    images = []
    for start in range(0, len(labels), batch):
        chunk = [int(c) for c in labels[start:start + batch]]
        generator = torch.Generator().manual_seed(seed + start)
        if hasattr(pipe, "get_label_ids"):  # DiTPipeline: class-conditional
            out = pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance,
                       output_type="pt", generator=generator).images
        else:
            out = pipe([prompt_for(c) for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       output_type="pt", generator=generator).images
        images.append(pipeline_images(out))
    return torch.cat(images)


@torch.inference_mode()
def generated_class_accuracy(pipe: Any, classifier: Any, per_class: int, steps: int, guidance: float,
                             seed: int = 0, batch: int = 50) -> float:
    """Generate ``per_class`` images of every class at ``steps`` steps; the fraction
    ``classifier`` (fashion-vit) labels as the requested class."""
    from ..eval.bench import accuracy
    from .fashion_vit import preprocess

    labels = torch.arange(len(FASHION_CLASSES)).repeat_interleave(per_class)
    images = generate(pipe, labels, steps, guidance, seed, batch)
    return accuracy(classifier(preprocess(images)), labels)


def write_generation_metrics(folder: Path, pipe: Any, classifier: Any, per_class: int, inference_steps: int,
                             guidance: float, seed: int, **extra: Any) -> Dict[str, Any]:
    """A trained pipeline's ``metrics.json``: its generated-class accuracy (and ``extra`` entries)."""
    import json

    accuracy = generated_class_accuracy(pipe, classifier, per_class, inference_steps, guidance, seed)
    metrics = {"generated_class_accuracy": accuracy, "images": per_class * len(FASHION_CLASSES),
               "inference_steps": inference_steps, "guidance_scale": guidance, **extra}
    (Path(folder) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {folder}: {json.dumps(metrics)}", flush=True)
    return metrics
