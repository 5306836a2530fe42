"""Settings of RegionCache and the shorthand values ``accel.patch(..., region_cache=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..settings import Settings, check_choice, check_int, check_real, is_real

__all__ = ["RegionCache", "METRICS"]

METRICS = ("delta", "std", "l2norm")


@dataclass(frozen=True)
class RegionCache(Settings):
    """Region-adaptive sampling (after RAS, Liu et al. 2025): on cached steps only the regions in
    focus go through the transformer blocks; the others reuse their output of the previous step.

    ratio: fraction of the patch tokens recomputed on a cached step, in (0, 1]; the count is
        ``max(1, round(ratio * tokens))`` (1.0 = every token every step, identical to unpatched).
    warmup: the first steps of a sampling run are computed in full (RAS: 4).
    refresh: after warm-up, every ``refresh``-th step is computed in full again, which resets the
        drift of cached regions (RAS's "error reset" steps); 0 = never.
    window: a region is a ``window x window`` square of patch tokens (1 = single tokens); whole
        regions are chosen, in order of score, the last one partly if the count ends inside it.
    metric: the focus score of a token, from the model output of the previous step (under
        classifier-free guidance: the guided output the scheduler integrates):
        ``"delta"`` the norm of the output's change since the token was last computed (regions
        whose update between steps is small are the ones reused), ``"std"`` the standard deviation
        or ``"l2norm"`` the norm of the token's output (RAS's two metrics). Highest scores are
        recomputed. ``"delta"`` needs ``warmup >= 2`` (two outputs to compare).
    starvation: a skipped token's score is multiplied by ``exp(starvation * steps skipped)``
        (RAS's starvation scale, default 1 as in its released settings) so no region is cached for
        long; 0 = off.
    """

    ratio: float = 0.5
    warmup: int = 4
    refresh: int = 6
    window: int = 1
    metric: str = "delta"
    starvation: float = 1.0

    METHOD = "region_cache"
    EXPECTED = "a float ratio in (0, 1] or a dict of settings"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_real("RegionCache", "ratio", self.ratio, lambda v: 0.0 < v <= 1.0,
                                                     "a float in (0, 1] (fraction of tokens recomputed)"))
        for name, low in (("warmup", 1), ("refresh", 0), ("window", 1)):
            object.__setattr__(self, name, check_int("RegionCache", name, getattr(self, name), low))
        object.__setattr__(self, "metric", check_choice("RegionCache", "metric", self.metric, METRICS))
        if self.metric == "delta" and self.warmup < 2:
            raise ValueError(f"RegionCache: metric 'delta' compares two outputs and needs warmup >= 2; "
                             f"got warmup={self.warmup}")
        object.__setattr__(self, "starvation", check_real(
            "RegionCache", "starvation", self.starvation, lambda v: math.isfinite(v) and v >= 0,
            "a finite float >= 0 (0 = off)"))

    def is_full(self, step: int) -> bool:
        """Whether sampling step ``step`` (0-based) is computed in full by the schedule."""
        if step < self.warmup:
            return True
        return self.refresh > 0 and (step - self.warmup) % self.refresh == self.refresh - 1

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``region_cache=0.5`` -> RegionCache(ratio=0.5)."""
        return {"ratio": value} if is_real(value) else None
