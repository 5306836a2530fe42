"""TokenExit adapter for timm models. UNDER CONSTRUCTION."""
from __future__ import annotations

from typing import Any

from ..base import MethodPatch
from .config import TokenExit

__all__ = ["TokenExitTimm", "SUPPORTED", "matches"]

SUPPORTED = "under construction"


def matches(obj: Any) -> bool:
    return False


class TokenExitTimm(MethodPatch):
    method = "token_exit"

    def __init__(self, model: Any, config: TokenExit) -> None:
        super().__init__(model, config)
        raise NotImplementedError("token_exit: under construction")
