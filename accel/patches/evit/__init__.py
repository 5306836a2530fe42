"""EViT: keep the tokens the CLS token attends to most, fuse the rest (Liang et al., ICLR 2022).

    accel.patch(vit, evit=0.7)                                   # keep rate 0.7 at the default blocks
    accel.patch(vit, evit=accel.EViT(keep_rate=0.5, locations=[3, 6, 9]))

Training-free; ``keep_rate=1.0`` is the unpatched model. See ``docs/evit.md``.
"""
from __future__ import annotations

from ..registry import Method
from .config import EViT, default_locations
from .keep import cls_attention, keep_and_fuse, num_kept
from .timm import EViTTimm

METHOD = Method("evit", EViT, (EViTTimm,), decides_tokens=True, package=__name__)

__all__ = ["METHOD", "EViT", "default_locations", "cls_attention", "keep_and_fuse", "num_kept"]
