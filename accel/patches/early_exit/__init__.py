"""Early exit per image: exit heads after chosen blocks of a timm ViT, trained by self-distillation
with the backbone frozen; an image leaves the batch at the first head confident enough.

Reachable as ``accel.early_exit``:

    heads = accel.early_exit.fit_heads(vit, (images, labels), blocks=[1, 3, 5, 7])
    accel.early_exit.calibrate_heads(vit, heads, (held_out, held_out_labels), max_drop=0.01)
    accel.early_exit.save_heads("my-exits", heads)
    accel.patch(vit, early_exit="my-exits")           # or early_exit=heads, or accel.EarlyExit(...)
    logits = vit(x)
    accel.early_exit.exit_depths(vit)                  # [B] blocks computed per image

Modules: ``heads`` (ExitHeads, save/load), ``policy`` (confidence, exit rule, ``calibrate``:
tensors only), ``train`` (``fit_heads``, ``calibrate_heads``), ``timm`` (the adapter).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..registry import Method, require_patch
from .config import EarlyExit
from .heads import ExitHead, ExitHeads, load_heads, save_heads
from .policy import CRITERIA, NEVER, Calibration, calibrate, confidence, exit_mask, first_exit
from .timm import EarlyExitTimm
from .train import calibrate_heads, exit_outputs, fit_heads, store_calibration, train_on_features

METHOD = Method("early_exit", EarlyExit, (EarlyExitTimm,), decides_tokens=True, package=__name__)

__all__ = [
    "METHOD",
    "EarlyExit",
    "ExitHead",
    "ExitHeads",
    "save_heads",
    "load_heads",
    "CRITERIA",
    "NEVER",
    "confidence",
    "exit_mask",
    "first_exit",
    "Calibration",
    "calibrate",
    "fit_heads",
    "train_on_features",
    "calibrate_heads",
    "exit_outputs",
    "store_calibration",
    "exit_depths",
]


def exit_depths(model: Any) -> Optional[torch.Tensor]:
    """``[B]`` int64: blocks each image of the last call ran through (its exit block + 1, or the
    model's depth for those the final head classified); None before the first call."""
    return require_patch(model, "early_exit", "early_exit.exit_depths").exit_depths()
