"""EViT adapter for timm models. UNDER CONSTRUCTION."""
from __future__ import annotations

from typing import Any

from ..base import MethodPatch
from .config import EViT

__all__ = ["EViTTimm", "SUPPORTED", "matches"]

SUPPORTED = "under construction"


def matches(obj: Any) -> bool:
    return False


class EViTTimm(MethodPatch):
    method = "evit"

    def __init__(self, model: Any, config: EViT) -> None:
        super().__init__(model, config)
        raise NotImplementedError("evit: under construction")
