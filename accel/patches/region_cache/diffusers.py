"""RegionCache adapter for diffusers models. UNDER CONSTRUCTION."""
from __future__ import annotations

from typing import Any

from ..base import MethodPatch
from .config import RegionCache

__all__ = ["RegionCacheDiT", "SUPPORTED", "matches"]

SUPPORTED = "under construction"


def matches(obj: Any) -> bool:
    return False


class RegionCacheDiT(MethodPatch):
    method = "region_cache"

    def __init__(self, model: Any, config: RegionCache) -> None:
        super().__init__(model, config)
        raise NotImplementedError("region_cache: under construction")
