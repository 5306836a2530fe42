"""Settings of DeepCache and the shorthand values ``accel.patch(..., deepcache=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from ..settings import Settings, check_choice, check_int, check_real, is_int
from .schedule import SCHEDULES, DeepCacheSchedule

__all__ = ["DeepCache"]


@dataclass(frozen=True)
class DeepCache(Settings):
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

    METHOD = "deepcache"
    EXPECTED = "an int interval or a dict of settings"

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", check_int("DeepCache", "interval", self.interval, 1,
                                                       "an int >= 1 (1 = every step in full)"))
        object.__setattr__(self, "branch", check_int("DeepCache", "branch", self.branch, 0,
                                                     "an int >= 0 (0 = the shallowest skip branch)"))
        object.__setattr__(self, "schedule", check_choice("DeepCache", "schedule", self.schedule, SCHEDULES))
        if is_int(self.center):
            center = check_int("DeepCache", "center", self.center, 0, "a step index >= 0 when an int")
        else:
            center = check_real("DeepCache", "center", self.center, lambda v: 0.0 <= v <= 1.0,
                                "a float fraction of the steps in [0, 1] or an int step index")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "power", check_real("DeepCache", "power", self.power,
                                                     lambda v: v > 0 and math.isfinite(v),
                                                     "a finite float > 0 (paper: 1.4)"))

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``deepcache=3`` -> DeepCache(interval=3)."""
        return {"interval": value} if is_int(value) else None

    def make_schedule(self) -> DeepCacheSchedule:
        return DeepCacheSchedule(self.interval, self.schedule, self.center, self.power)
