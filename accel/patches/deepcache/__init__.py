"""DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024).

A UNet's deep features change slowly between adjacent denoising steps. Every N-th step runs
the whole UNet and caches the input of the up layer on a skip branch; the steps in between
run only the shallow branch (the layers that make and read skip features 0..branch) on the cache.

Reachable as ``accel.deepcache``: the config ``DeepCache``, the pure ``DeepCacheSchedule`` and
``reset(obj)`` to start a new sampling run on a patched bare UNet.
"""
from __future__ import annotations

from typing import Any, Optional

from ..registry import Method, require_patch
from ..settings import is_int
from .config import DeepCache
from .schedule import DeepCacheSchedule
from .unet import DeepCacheUNet

METHOD = Method("deepcache", DeepCache, (DeepCacheUNet,), package=__name__)

__all__ = ["METHOD", "DeepCache", "DeepCacheSchedule", "reset"]


def reset(obj: Any, num_steps: Optional[int] = None) -> None:
    """Start a new sampling run on a patched object: the step count and the cache are cleared.

    A patched pipeline resets itself at every call; a bare UNet (patched directly) counts its
    own calls, one per step, until this is called. ``num_steps`` is needed by the non-uniform
    schedule on a bare UNet.
    """
    patch = require_patch(obj, "deepcache", "deepcache.reset")
    if num_steps is not None and (not is_int(num_steps) or num_steps < 1):
        raise ValueError(f"deepcache.reset: num_steps must be an int >= 1; got {num_steps!r}")
    patch.reset(None if num_steps is None else int(num_steps))
