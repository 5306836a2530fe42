"""Region-adaptive caching for DiT-style diffusion transformers (after RAS, Liu et al. 2025,
"Region-Adaptive Sampling for Diffusion Transformers"): on cached steps only the regions in focus
go through the transformer blocks; the others reuse their output of the previous step.

Reachable as ``accel.region_cache``: the config ``RegionCache`` and ``reset(obj)`` to start a new
sampling run on a patched bare transformer (a patched pipeline resets itself at every call).
"""
from __future__ import annotations

from typing import Any

from .config import RegionCache

__all__ = ["RegionCache", "reset"]


def reset(obj: Any) -> None:
    """Start a new sampling run on a patched object: step count, scores and caches are cleared.

    A bare transformer (patched directly) counts its own calls, one per denoising step, until
    this is called.
    """
    from ...api import get_patch

    patch = get_patch(obj, "region_cache")
    if patch is None:
        raise ValueError(f"region_cache is not patched on {type(obj).__name__}")
    patch.reset()
