"""Settings of EViT and the shorthand values ``accel.patch(..., evit=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["EViT"]


@dataclass(frozen=True)
class EViT:
    """UNDER CONSTRUCTION."""

    @classmethod
    def coerce(cls, value: Any) -> "EViT":
        if isinstance(value, cls):
            return value
        raise NotImplementedError("evit: under construction")
