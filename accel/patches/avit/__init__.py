"""A-ViT adaptive token halting (Yin et al., CVPR 2022) with real token removal.

``halting`` holds the arithmetic (tensors only), ``timm`` the adapter, ``train`` the fine-tuning,
``config`` the settings and the halting file. Reachable as ``accel.avit``:

    result = accel.avit.finetune(vit, batches, steps=500)   # task + ponder + KL losses
    accel.avit.save("halting.safetensors", result.config)   # gamma, beta, eps: not in the backbone
    accel.patch(vit, avit="halting.safetensors")            # or avit=accel.AViT(...)
    logits = vit(images)
    accel.avit.depth_map(vit)                                # [B, gh, gw] blocks each patch ran
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..registry import Method, require_patch
from .config import AViT, load, metadata, save
from .halting import (HaltingState, gaussian_prior, halting_distribution, halting_score, kl_divergence,
                      ponder_loss)
from .timm import AViTTimm
from .train import FinetuneResult, distillation_loss, finetune, training_loss

METHOD = Method("avit", AViT, (AViTTimm,), decides_tokens=True, package=__name__)

__all__ = ["METHOD", "AViT", "save", "load", "metadata", "halting_score", "HaltingState", "ponder_loss",
           "halting_distribution", "gaussian_prior", "kl_divergence", "finetune", "FinetuneResult",
           "training_loss", "distillation_loss", "depth_map"]


def depth_map(model: Any) -> Optional[torch.Tensor]:
    """``[B, gh, gw]`` long: the number of blocks each patch token ran in the last call of the
    avit-patched ``model`` (``[B, N_patches]`` if the tokens form no known grid); None before
    the first call."""
    return require_patch(model, "avit", "avit.depth_map").depth_map()
