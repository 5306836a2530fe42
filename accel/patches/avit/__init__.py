"""A-ViT adaptive token halting (Yin et al., CVPR 2022) with real token removal.

UNDER CONSTRUCTION: skeleton, filled in by its owner."""
from __future__ import annotations

from .config import AViT

__all__ = ["AViT"]
