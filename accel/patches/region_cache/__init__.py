"""Region-adaptive caching for DiT-style diffusion transformers (after RAS, Liu et al. 2025,
"Region-Adaptive Sampling for Diffusion Transformers"): on cached steps only the regions in focus
go through the transformer blocks; the others reuse their output of the previous step.

Reachable as ``accel.region_cache``: the config ``RegionCache`` and ``reset(obj)`` to start a new
sampling run on a patched bare transformer (a patched pipeline resets itself at every call).
"""
from __future__ import annotations

from typing import Any

from ..registry import Method, require_patch
from .config import RegionCache
from .diffusers import RegionCacheDiT

METHOD = Method("region_cache", RegionCache, (RegionCacheDiT,), decides_tokens=True, package=__name__)

__all__ = ["METHOD", "RegionCache", "reset"]


def reset(obj: Any) -> None:
    """Start a new sampling run on a patched object: step count, scores and caches are cleared.

    A bare transformer (patched directly) counts its own calls, one per denoising step, until
    this is called.
    """
    require_patch(obj, "region_cache", "region_cache.reset").reset()
