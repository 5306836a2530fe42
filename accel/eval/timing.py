"""Side-by-side timing: baseline and methods interleaved in one process, medians reported.

Shared machines swing several-fold under load; timing each variant in its own block of runs
would attribute that drift to one of them. Interleaving (with the order rotated every round)
exposes every variant to the same conditions, and the median ignores stragglers.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

__all__ = ["Timing", "time_interleaved"]


@dataclass
class Timing:
    """Seconds per call of one variant over the interleaved rounds."""

    seconds: List[float] = field(default_factory=list)
    items_per_call: int = 1

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_s(self) -> float:
        return self.items_per_call / self.median_s

    def speedup_over(self, baseline: "Timing") -> float:
        """Ratio of median times: > 1 means faster than ``baseline``."""
        return baseline.median_s / self.median_s


def time_interleaved(
    variants: Dict[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    items_per_call: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    sync: Optional[Callable[[], Any]] = None,
) -> Dict[str, Timing]:
    """Run every variant ``warmup`` times, then ``repeats`` rounds of one call each.

    Round k starts with variant k (mod the number of variants), so no variant always runs
    right after the same neighbour. ``sync`` (e.g. ``torch.cuda.synchronize``) is called before
    each call's clock starts and before it stops, so asynchronous devices are timed to completion.
    Returns {name: Timing} in the order given.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    names = list(variants)
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    timings = {name: Timing(items_per_call=items_per_call) for name in names}
    for k in range(repeats):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            wait()
            start = clock()
            variants[name]()
            wait()
            timings[name].seconds.append(clock() - start)
    return timings
