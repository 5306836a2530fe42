"""Settings of RegionCache and the shorthand values ``accel.patch(..., region_cache=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RegionCache"]


@dataclass(frozen=True)
class RegionCache:
    """UNDER CONSTRUCTION."""

    @classmethod
    def coerce(cls, value: Any) -> "RegionCache":
        if isinstance(value, cls):
            return value
        raise NotImplementedError("region_cache: under construction")
