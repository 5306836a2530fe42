"""AViT adapter for timm models. UNDER CONSTRUCTION."""
from __future__ import annotations

from typing import Any

from ..base import MethodPatch
from .config import AViT

__all__ = ["AViTTimm", "SUPPORTED", "matches"]

SUPPORTED = "under construction"


def matches(obj: Any) -> bool:
    return False


class AViTTimm(MethodPatch):
    method = "avit"

    def __init__(self, model: Any, config: AViT) -> None:
        super().__init__(model, config)
        raise NotImplementedError("avit: under construction")
