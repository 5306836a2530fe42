"""EarlyExit adapter for timm models. UNDER CONSTRUCTION."""
from __future__ import annotations

from typing import Any

from ..base import MethodPatch
from .config import EarlyExit

__all__ = ["EarlyExitTimm", "SUPPORTED", "matches"]

SUPPORTED = "under construction"


def matches(obj: Any) -> bool:
    return False


class EarlyExitTimm(MethodPatch):
    method = "early_exit"

    def __init__(self, model: Any, config: EarlyExit) -> None:
        super().__init__(model, config)
        raise NotImplementedError("early_exit: under construction")
