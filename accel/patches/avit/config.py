"""Settings of AViT and the shorthand values ``accel.patch(..., avit=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AViT"]


@dataclass(frozen=True)
class AViT:
    """UNDER CONSTRUCTION."""

    @classmethod
    def coerce(cls, value: Any) -> "AViT":
        if isinstance(value, cls):
            return value
        raise NotImplementedError("avit: under construction")
