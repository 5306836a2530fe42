"""The built-in A-ViT classifier: ``fashion-vit`` fine-tuned for A-ViT token halting.

``assets/fashion-vit-avit/`` (made by ``scripts/train_fashion_avit.py``) holds the fine-tuned
backbone as a plain timm state dict (``model.safetensors``, fp16), its halting parameters apart
(``halting.safetensors``: gamma, beta, eps; ``accel.avit.load``) and ``config.json`` with the
model arguments, the training settings and the measured metrics.

    vit, config = accel.pipelines.load("fashion-vit-avit")
    accel.patch(vit, avit=config)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Tuple

from .data import ASSETS

__all__ = ["FASHION_AVIT_DIR", "load_fashion_avit"]

FASHION_AVIT_DIR = ASSETS / "fashion-vit-avit"


def load_fashion_avit(folder: Optional[Path] = None) -> Tuple[Any, Any]:
    """``(model, accel.AViT)``: the fine-tuned timm ViT (eval, fp32, unpatched) and its halting settings."""
    from ..patches.avit import load
    from .fashion_vit import load_fashion_vit

    folder = Path(folder or FASHION_AVIT_DIR)
    json.loads((folder / "config.json").read_text())  # fail early on a half-written asset
    return load_fashion_vit(folder), load(folder / "halting.safetensors")
