"""Settings of RegionCache and the shorthand values ``accel.patch(..., region_cache=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["RegionCache", "METRICS"]

METRICS = ("delta", "std", "l2norm")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RegionCache:
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
        ``"delta"`` the norm of the output's change since the token was last computed (the
        issue's "regions whose update between steps is small"), ``"std"`` the standard deviation
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

    def __post_init__(self) -> None:
        if not _is_real(self.ratio):
            raise TypeError(f"RegionCache: ratio must be a float in (0, 1]; got {type(self.ratio).__name__}")
        if not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"RegionCache: ratio is the fraction of tokens recomputed, in (0, 1]; got {self.ratio}")
        object.__setattr__(self, "ratio", float(self.ratio))
        for name, low in (("warmup", 1), ("refresh", 0), ("window", 1)):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"RegionCache: {name} must be an int >= {low}; got {type(value).__name__}")
            if value < low:
                raise ValueError(f"RegionCache: {name} must be an int >= {low}; got {value}")
        if not isinstance(self.metric, str):
            raise TypeError(f"RegionCache: metric must be one of {METRICS}; got {type(self.metric).__name__}")
        if self.metric not in METRICS:
            raise ValueError(f"RegionCache: metric must be one of {METRICS}; got {self.metric!r}")
        if self.metric == "delta" and self.warmup < 2:
            raise ValueError(f"RegionCache: metric 'delta' compares two outputs and needs warmup >= 2; "
                             f"got warmup={self.warmup}")
        if not _is_real(self.starvation):
            raise TypeError(f"RegionCache: starvation must be a float >= 0; got {type(self.starvation).__name__}")
        if not (self.starvation >= 0 and math.isfinite(self.starvation)):
            raise ValueError(f"RegionCache: starvation must be a finite float >= 0 (0 = off); got {self.starvation}")
        object.__setattr__(self, "starvation", float(self.starvation))

    def is_full(self, step: int) -> bool:
        """Whether sampling step ``step`` (0-based) is computed in full by the schedule."""
        if step < self.warmup:
            return True
        return self.refresh > 0 and (step - self.warmup) % self.refresh == self.refresh - 1

    @classmethod
    def coerce(cls, value: Any) -> "RegionCache":
        """``region_cache=0.5`` -> RegionCache(ratio=0.5); a dict -> RegionCache(**dict)."""
        if isinstance(value, cls):
            return value
        if _is_real(value):
            return cls(ratio=value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"region_cache: unknown settings {unknown}; known: {sorted(known)}")
            return cls(**value)
        raise TypeError(
            "region_cache: expected accel.RegionCache(...), a float ratio in (0, 1] or a dict of settings; "
            f"got {type(value).__name__}"
        )
