"""Region-adaptive sampling for DiT-style models: regions whose update is small reuse their cached output (after RAS, Liu et al. 2025).

UNDER CONSTRUCTION: skeleton, filled in by its owner."""
from __future__ import annotations

from .config import RegionCache

__all__ = ["RegionCache"]
