"""The built-in ViT classifier: a timm ``VisionTransformer`` trained on Fashion-MNIST.

28x28 grey images in 4x4 patches: 49 patch tokens and a CLS token, width 128, 12 blocks.
Weights ship as ``assets/fashion-vit/model.safetensors`` (made by ``scripts/train_fashion_vit.py``)
beside ``config.json`` holding the model arguments, the preprocessing and the measured metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .data import ASSETS, FASHION_CLASSES

__all__ = ["FASHION_VIT_ARGS", "FASHION_MEAN", "FASHION_STD", "build_fashion_vit", "load_fashion_vit",
           "preprocess"]

FASHION_VIT_DIR = ASSETS / "fashion-vit"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the Fashion-MNIST training images, pixel/255
FASHION_VIT_ARGS: Dict[str, Any] = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=12, num_heads=4,
    mlp_ratio=4.0, global_pool="token",
)


def _pretrained_cfg() -> Dict[str, Any]:
    """What ``timm.data.resolve_model_data_config(model)`` reads to preprocess correctly."""
    return dict(
        input_size=(1, 28, 28), mean=(FASHION_MEAN,), std=(FASHION_STD,), interpolation="bilinear",
        crop_pct=1.0, crop_mode="center", num_classes=10, label_names=list(FASHION_CLASSES),
        architecture="vit_tiny_patch16_224", tag="fashion_mnist", license="MIT (data)",
    )


def build_fashion_vit(model_args: Optional[Dict[str, Any]] = None, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """The architecture with fresh weights (seed them with ``torch.manual_seed`` first)."""
    import timm

    args = dict(model_args or FASHION_VIT_ARGS, drop_path_rate=drop_path_rate)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    model.pretrained_cfg = _pretrained_cfg()
    model.default_cfg = model.pretrained_cfg
    return model


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> normalised float ``[N, 1, 28, 28]``."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"images must be uint8 [N, 28, 28]; got {images.dtype} {tuple(images.shape)}")
    return (images.unsqueeze(1).float() / 255.0 - FASHION_MEAN) / FASHION_STD


def load_fashion_vit(folder: Optional[Path] = None) -> torch.nn.Module:
    """The trained classifier in eval mode, fp32, offline."""
    from safetensors.torch import load_file

    folder = Path(folder or FASHION_VIT_DIR)
    config = json.loads((folder / "config.json").read_text())
    model = build_fashion_vit(config["model_args"])
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()
