"""The built-in class-conditional pipeline: a diffusers ``DiTPipeline`` of standard parts.

- ``DiTTransformer2DModel`` (adaLN-Zero blocks, 2x2 patches of 4x16x16 latents = 64 tokens); its
  label tables have 1001 rows so that id 1000, the pipeline's null class for guidance, is the
  learnt unconditional embedding.
- ``AutoencoderKL``: fashion-sd's autoencoder (1-channel 32x32 images <-> 4x16x16 latents).
- ``DDIMScheduler`` with Stable Diffusion's noise schedule.

``id2label`` names the ten Fashion-MNIST classes, so ``pipe.get_label_ids(["sneaker"])`` works.
Made by ``scripts/train_fashion_dit.py``; saved with ``save_pretrained`` in ``assets/fashion-dit``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .data import ASSETS, FASHION_CLASSES
from .fashion_sd import IMAGE_SIZE, noise_scheduler_config

__all__ = ["NULL_CLASS", "build_transformer", "assemble_dit_pipeline", "save_dit_pipeline", "load_fashion_dit"]

FASHION_DIT_DIR = ASSETS / "fashion-dit"
NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional label


def build_transformer():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=8,
        sample_size=IMAGE_SIZE // 2, patch_size=2, num_embeds_ada_norm=NULL_CLASS,
    )


def assemble_dit_pipeline(transformer: Any, vae: Any):
    from diffusers import DDIMScheduler, DiTPipeline

    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**noise_scheduler_config()),
                       id2label={i: name for i, name in enumerate(FASHION_CLASSES)})


def save_dit_pipeline(pipe: Any, folder: Path) -> None:
    """``save_pretrained``, plus the class names in ``model_index.json`` (``id2label`` is a constructor
    argument that diffusers does not save; ``from_pretrained`` passes it back from there)."""
    pipe.save_pretrained(folder)
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(FASHION_CLASSES)}
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def load_fashion_dit(folder: Optional[Path] = None):
    """The trained ``DiTPipeline``, fp32, CPU, offline."""
    from diffusers import DiTPipeline
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers warns that the JSON keys of id2label are strings
    try:
        pipe = DiTPipeline.from_pretrained(str(folder or FASHION_DIT_DIR), local_files_only=True)
    finally:
        logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe
