"""Side-by-side timing: baseline and methods interleaved in one process, medians reported.

Shared machines swing several-fold under load; timing each variant in its own block of runs
would attribute that drift to one of them. Interleaving (with the order rotated every round)
exposes every variant to the same conditions, and the median ignores stragglers. Ratios survive
a moderate load, but not one that takes this process's threads away for part of a call: the
process CPU time is read beside the wall time so that such a run can say so (``busy_warning``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .progress import duration, progress_bar

__all__ = ["Timing", "time_interleaved", "cpu_per_wall", "busy_warning", "process_cpu_seconds", "BUSY_FRACTION"]

# Warn when the timed calls got less than this share of the threads torch runs with. Measured on
# the idle 2-core CPU (docs/benchmarks.md, accel_bench), every workload of `accel bench` read 1.97-1.99
# CPU seconds per wall second; beside one competing busy process 1.27-1.30 (and fashion-vit's ToMe
# ratios fell from 1.4-1.8x to 1.0-1.1x), beside two 0.99. Only an idle machine passes 0.85.
BUSY_FRACTION = 0.85


@dataclass
class Timing:
    """Seconds per call of one variant over the interleaved rounds (wall clock, and the process's
    CPU time over the same calls)."""

    seconds: List[float] = field(default_factory=list)
    items_per_call: int = 1
    cpu_seconds: List[float] = field(default_factory=list)

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
    cpu_clock: Optional[Callable[[], float]] = None,
    sync: Optional[Callable[[], Any]] = None,
    progress: Optional[str] = None,
    log: Optional[Callable[[str], Any]] = None,
) -> Dict[str, Timing]:
    """Run every variant ``warmup`` times, then ``repeats`` rounds of one call each.

    Round k starts with variant k (mod the number of variants), so no variant always runs
    right after the same neighbour. ``sync`` (e.g. ``torch.cuda.synchronize``) is called before
    each call's clock starts and before it stops, so asynchronous devices are timed to completion.
    ``cpu_clock`` (default ``process_cpu_seconds``: CPU seconds of all this process's threads) is
    read around the same calls as ``clock``. ``progress``: a label for a progress bar on stderr;
    ``log`` (e.g. ``print``) is told after the warm-up how long the rounds will take.
    Returns {name: Timing} in the order given.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    names = list(variants)
    wait = sync or (lambda: None)
    cpu = cpu_clock or process_cpu_seconds
    timings = {name: Timing(items_per_call=items_per_call) for name in names}
    with progress_bar(progress, total=(warmup + repeats) * len(names), unit="call") as bar:
        warmup_start = clock()
        for _ in range(warmup):
            for name in names:
                variants[name]()
                bar.update()
        if log is not None and warmup:
            # A warm-up round costs what a timed round will (first-call overheads make it an upper bound).
            log(f"{progress or 'timing'}: {len(names)} settings x {repeats} rounds, about "
                f"{duration((clock() - warmup_start) / warmup * repeats)}")
        for k in range(repeats):
            shift = k % len(names)
            for name in names[shift:] + names[:shift]:
                wait()
                start, cpu_start = clock(), cpu()
                variants[name]()
                wait()
                timings[name].seconds.append(clock() - start)
                timings[name].cpu_seconds.append(cpu() - cpu_start)
                bar.update()
    return timings


def process_cpu_seconds() -> float:
    """CPU seconds used so far by all threads of this process (``time.process_time``); the default
    ``cpu_clock``, looked up at call time."""
    return time.process_time()


def cpu_per_wall(timings: Dict[str, Timing]) -> Optional[float]:
    """CPU seconds this process used per wall second over every timed call: about the thread
    count when the machine was idle, less when other processes took cores. None without readings."""
    wall = sum(sum(t.seconds) for t in timings.values())
    used = sum(sum(t.cpu_seconds) for t in timings.values())
    if wall <= 0 or not any(t.cpu_seconds for t in timings.values()):
        return None
    return used / wall


def busy_warning(cpu_used: Optional[float], threads: Optional[int] = None,
                 fraction: float = BUSY_FRACTION) -> Optional[str]:
    """A warning line when the timed calls got less than ``fraction`` of ``threads`` (default
    ``torch.get_num_threads()``) CPU seconds per wall second; None when they did not (or unknown).
    For CPU runs: on a GPU the host waits for the device, and the reading says nothing of the load."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    if cpu_used is None or cpu_used >= fraction * threads:
        return None
    return (f"warning: the machine was busy (CPU used {cpu_used:.1f} of {threads} threads); speedups below are "
            f"unreliable, rerun on an idle machine")
