"""Which denoising steps run the full UNet (DeepCache, Ma et al., CVPR 2024, Sec. 3.3).

Pure Python: step indices in, step indices out; no framework import.

- ``uniform`` (the paper's "uniform 1:N"): steps 0, N, 2N, ... run in full.
- ``non-uniform`` (the paper's "non-uniform 1:N"): the same number of full steps,
  ``ceil(num_steps / N)``, placed more densely around a centre step ``c``. Following the paper,
  ``k`` points are spaced evenly in a warped space ``l = sign(i - c) * |i - c| ** (1 / p)``
  from step 0 to the last step and mapped back with ``i = c + sign(l) * |l| ** p``; with
  ``p > 1`` they crowd around ``c``. Points are rounded to integers; where rounding makes two
  coincide, the free steps nearest the centre fill in so the count stays ``k``.

Step 0 is always full: nothing is cached before it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

__all__ = ["DeepCacheSchedule", "SCHEDULES"]

SCHEDULES = ("uniform", "non-uniform")


def _signed_power(x: float, p: float) -> float:
    return math.copysign(abs(x) ** p, x)


class DeepCacheSchedule:
    """The full steps of a run of ``num_steps`` steps.

    interval: N >= 1, one full step per N steps on average (1 = every step is full).
    kind: ``"uniform"`` or ``"non-uniform"``.
    center: non-uniform only; a float in [0, 1] is a fraction of ``num_steps`` (0.3 puts the
        centre at step 15 of 50, the paper's setting), an int is a step index (clamped to the
        last step).
    power: non-uniform only; p > 0, the paper uses 1.4 (1 = evenly spaced, larger = denser
        near the centre).
    """

    def __init__(self, interval: int, kind: str = "uniform", center: Union[int, float] = 0.3,
                 power: float = 1.4) -> None:
        if interval < 1:
            raise ValueError(f"DeepCacheSchedule: interval must be >= 1; got {interval}")
        if kind not in SCHEDULES:
            raise ValueError(f"DeepCacheSchedule: kind must be one of {SCHEDULES}; got {kind!r}")
        if not power > 0:
            raise ValueError(f"DeepCacheSchedule: power must be > 0; got {power}")
        self.interval = int(interval)
        self.kind = kind
        self.center = center
        self.power = float(power)
        self._memo: tuple = (None, frozenset())  # (num_steps, full steps): is_full runs once per step

    def num_full(self, num_steps: int) -> int:
        """How many of ``num_steps`` steps run in full: ``ceil(num_steps / interval)``."""
        return -(-num_steps // self.interval)

    def center_step(self, num_steps: int) -> int:
        if isinstance(self.center, float):
            c = int(round(self.center * num_steps))
        else:
            c = int(self.center)
        return max(0, min(c, num_steps - 1))

    def full_steps(self, num_steps: int) -> List[int]:
        """Sorted indices (in ``[0, num_steps)``) of the steps that run the full UNet."""
        if num_steps <= 0:
            return []
        if self.kind == "uniform":
            return list(range(0, num_steps, self.interval))
        k = self.num_full(num_steps)
        if k >= num_steps:
            return list(range(num_steps))
        if k == 1:
            return [0]
        c, p, last = self.center_step(num_steps), self.power, num_steps - 1
        lo, hi = _signed_power(-c, 1.0 / p), _signed_power(last - c, 1.0 / p)
        chosen = {0}
        for j in range(k):  # linear_space in the warped space, then back (paper, Sec. 3.3)
            l = lo + (hi - lo) * j / (k - 1)
            chosen.add(max(0, min(last, int(round(c + _signed_power(l, p))))))
        # rounding can merge neighbours near the centre: refill there, nearest first (ties: earlier)
        free = sorted((i for i in range(num_steps) if i not in chosen), key=lambda i: (abs(i - c), i))
        for i in free[: max(0, k - len(chosen))]:
            chosen.add(i)
        return sorted(chosen)

    def is_full(self, step: int, num_steps: Optional[int] = None) -> bool:
        """Whether step ``step`` runs in full. Steps past a known ``num_steps`` run in full."""
        if self.kind == "uniform":
            return step % self.interval == 0
        if num_steps is None:
            raise ValueError(
                "deepcache: the non-uniform schedule needs the number of steps; a bare UNet gets it "
                "from accel.deepcache.reset(unet, num_steps=...)"
            )
        if step >= num_steps:
            return True
        if self._memo[0] != num_steps:
            self._memo = (num_steps, frozenset(self.full_steps(num_steps)))
        return step in self._memo[1]

    def __repr__(self) -> str:
        extra = f", center={self.center}, power={self.power}" if self.kind == "non-uniform" else ""
        return f"DeepCacheSchedule(interval={self.interval}, kind={self.kind!r}{extra})"
