"""EViT: keep the tokens the CLS token attends to most, fuse the rest (Liang et al., ICLR 2022).

UNDER CONSTRUCTION: skeleton, filled in by its owner."""
from __future__ import annotations

from .config import EViT

__all__ = ["EViT"]
