"""DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024).

A UNet's deep features change slowly between adjacent denoising steps. Every N-th step runs
the whole UNet and caches the input of the up layer on a skip branch; the steps in between
run only the shallow branch (the layers that make and read skip features 0..branch) on the cache.

Reachable as ``accel.deepcache``: the config ``DeepCache``, the pure ``DeepCacheSchedule`` and
``reset(obj)`` to start a new sampling run on a patched bare UNet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from .schedule import SCHEDULES, DeepCacheSchedule

__all__ = ["DeepCache", "DeepCacheSchedule", "reset"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DeepCache:
    """DeepCache settings.

    interval: N >= 1; one step in N runs the full UNet (1 = every step, identical to unpatched).
    branch: the skip connection recomputed on the other steps, numbered as the UNet collects
        them (0 = conv_in's: the shallowest and fastest, the paper's choice for Stable Diffusion;
        SD 1.5 has 12), checked when patching. Branch k keeps the layers that make skip features
        0..k and the up layers that read them live.
    schedule: ``"uniform"`` (steps 0, N, 2N, ... in full) or ``"non-uniform"`` (as many full
        steps, denser around ``center``; Sec. 3.3 of the paper).
    center: non-uniform centre: a float in [0, 1] is a fraction of the run's steps (default 0.3,
        i.e. the paper's step 15 of 50), an int a step index (clamped to the last step).
    power: non-uniform spacing exponent p > 0 (paper: 1.4; 1 = evenly spaced).
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: Union[int, float] = 0.3
    power: float = 1.4

    def __post_init__(self) -> None:
        if not _is_int(self.interval):
            raise TypeError(f"DeepCache: interval must be an int >= 1; got {type(self.interval).__name__}")
        if self.interval < 1:
            raise ValueError(f"DeepCache: interval must be an int >= 1 (1 = every step in full); got {self.interval}")
        if not _is_int(self.branch):
            raise TypeError(f"DeepCache: branch must be an int >= 0; got {type(self.branch).__name__}")
        if self.branch < 0:
            raise ValueError(f"DeepCache: branch must be >= 0 (0 = the shallowest skip branch); got {self.branch}")
        if not isinstance(self.schedule, str):
            raise TypeError(
                f"DeepCache: schedule must be a str, one of {SCHEDULES}; got {type(self.schedule).__name__}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"DeepCache: schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if not _is_real(self.center):
            raise TypeError(
                "DeepCache: center must be a float fraction in [0, 1] or an int step index; "
                f"got {type(self.center).__name__}"
            )
        if isinstance(self.center, float) and not 0.0 <= self.center <= 1.0:
            raise ValueError(f"DeepCache: center as a float is a fraction of the steps, in [0, 1]; got {self.center}")
        if _is_int(self.center) and self.center < 0:
            raise ValueError(f"DeepCache: center as an int is a step index >= 0; got {self.center}")
        if not _is_real(self.power):
            raise TypeError(f"DeepCache: power must be a float > 0; got {type(self.power).__name__}")
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"DeepCache: power must be a finite float > 0 (paper: 1.4); got {self.power}")
        object.__setattr__(self, "power", float(self.power))

    @classmethod
    def coerce(cls, value: Any) -> "DeepCache":
        """``deepcache=3`` -> DeepCache(interval=3); a dict -> DeepCache(**dict)."""
        if isinstance(value, cls):
            return value
        if _is_int(value):
            return cls(interval=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(
            "deepcache: expected accel.DeepCache(...), an int interval or a dict of settings; "
            f"got {type(value).__name__}"
        )

    def make_schedule(self) -> DeepCacheSchedule:
        return DeepCacheSchedule(self.interval, self.schedule, self.center, self.power)


def reset(obj: Any, num_steps: Optional[int] = None) -> None:
    """Start a new sampling run on a patched object: the step count and the cache are cleared.

    A patched pipeline resets itself at every call; a bare UNet (patched directly) counts its
    own calls, one per step, until this is called. ``num_steps`` is needed by the non-uniform
    schedule on a bare UNet.
    """
    from ...api import get_patch

    patch = get_patch(obj, "deepcache")
    if patch is None:
        raise ValueError(f"deepcache is not patched on {type(obj).__name__}")
    if num_steps is not None and (not _is_int(num_steps) or num_steps < 1):
        raise ValueError(f"deepcache.reset: num_steps must be an int >= 1; got {num_steps!r}")
    patch.reset(num_steps)
