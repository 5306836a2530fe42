"""``accel tune``: the fastest setting within a quality budget, chosen by measuring.

The candidates are every method that applies to the model, at the values its adapter offers
(``MethodPatch.tune_values``, mildest first), and every pair of them that may compose (two methods
that each decide which tokens a block computes are never paired). All candidates are measured on
a calibration set (``evaluate``) and kept in a cache file, so a rerun measures nothing; the choice is
the largest speedup among the settings that meet the budget, and it is measured again on held-out
data (other seeds, or other images) to show whether it stays within the budget there.

FID is not offered as a budget: below a few thousand images its bootstrap interval is wider than
the differences at stake (the report gives it with its interval).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .spec import UNPATCHED, Setting

__all__ = ["Budget", "TuneResult", "NoSettingMeetsBudget", "candidates", "choose", "tune", "default_cache"]

# metric key in a row -> (what it is, higher is better)
BUDGET_METRICS = {"psnr": ("PSNR vs unpatched, dB", True), "ssim": ("SSIM vs unpatched", True),
                  "clip_score": ("CLIP score", True), "accuracy_drop": ("top-1 accuracy drop, points", False)}


class TuneResult(dict):
    """``tune``'s result: a dict (it is written as JSON) whose keys also read as attributes, so that
    ``accel.patch(model, **result.settings)`` applies the choice."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class NoSettingMeetsBudget(ValueError):
    """No measured setting both meets the budget and is faster than the unpatched model."""


@dataclass(frozen=True)
class Budget:
    """``metric`` (a row key of ``BUDGET_METRICS``) must be at least (or, for drops, at most) ``bound``."""

    metric: str
    bound: float

    def __post_init__(self) -> None:
        if self.metric not in BUDGET_METRICS:
            raise ValueError(f"budget: metric must be one of {', '.join(BUDGET_METRICS)}; got {self.metric!r}")

    @property
    def higher_is_better(self) -> bool:
        return BUDGET_METRICS[self.metric][1]

    def met(self, row: Dict[str, Any]) -> bool:
        value = row.get(self.metric)
        if value is None:
            return False
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def __str__(self) -> str:
        return f"{BUDGET_METRICS[self.metric][0]} {'>=' if self.higher_is_better else '<='} {self.bound:g}"


def candidates(model: Any, methods: Optional[Sequence[str]] = None, compose: bool = True) -> List[Setting]:
    """Every setting ``accel tune`` measures on ``model``: each applicable method at its tune values,
    then each pair of methods that may compose at every pair of values. ``methods``: only these."""
    from ..patches import registry

    grids = {}
    for method in registry.methods():
        if methods is not None and method.name not in methods:
            continue
        adapter = next((a for a in method.adapters if a.matches(model)), None)
        values = adapter.tune_values(model) if adapter is not None else ()
        if values:
            grids[method.name] = (method, values)
    if methods is not None:
        missing = [m for m in methods if m not in grids]
        if missing:
            raise ValueError(f"--methods: {', '.join(missing)} cannot be tuned on this model; tunable here: "
                             f"{', '.join(grids) or 'none'}")
    settings = [Setting(f"{name}={value}", {name: value}) for name, (_, values) in grids.items() for value in values]
    if compose:
        for (a, (ma, va)), (b, (mb, vb)) in itertools.combinations(grids.items(), 2):
            if ma.decides_tokens and mb.decides_tokens:
                continue
            settings += [Setting(f"{a}={x},{b}={y}", {a: x, b: y}) for x in va for y in vb]
    if not settings:
        raise ValueError(f"tune: no method can be tuned on {type(model).__name__}")
    return settings


def choose(rows: Sequence[Dict[str, Any]], budget: Budget) -> Dict[str, Any]:
    """The fastest row that meets ``budget`` and beats the unpatched model (speedup > 1)."""
    fitting = [r for r in rows if r["settings"] != UNPATCHED and budget.met(r) and (r.get("speedup") or 0) > 1]
    if not fitting:
        best = max((r for r in rows if r["settings"] != UNPATCHED and r.get(budget.metric) is not None),
                   key=lambda r: r[budget.metric] if budget.higher_is_better else -r[budget.metric], default=None)
        hint = "" if best is None else f"; the best was {best['settings']} at {best[budget.metric]:.3g}"
        raise NoSettingMeetsBudget(f"no setting faster than the unpatched model meets {budget}{hint}")
    return max(fitting, key=lambda r: r["speedup"])


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "accel" / "tune.json"


def _key(context: Dict[str, Any], label: str) -> str:
    text = json.dumps({**context, "setting": label}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _save(cache: Path, stored: Dict[str, Any]) -> None:
    """The cache file: ``{"calibration": {key: row}, "held-out": {key: row}}``."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(stored, indent=1) + "\n")


def tune(model: Any, budget: Budget, measure: Callable[[List[Setting], str], List[Dict[str, Any]]], *,
         context: Dict[str, Any], cache: Optional[Path] = None, settings: Optional[List[Setting]] = None,
         log: Callable[[str], Any] = lambda _: None, write: bool = True) -> Dict[str, Any]:
    """Measure the candidates not in ``cache`` with ``measure(settings, "calibration")`` (rows as
    ``evaluate`` makes them), choose within ``budget``, then ``measure([chosen], "held-out")``
    unless that is cached too (a rerun measures nothing).
    ``context``: what makes measurements comparable (model, data, steps, machine ...); it keys the
    cache; ``write=False`` leaves the cache file alone (the other processes of a sharded run, which
    measure along with the main one and read the same file). Returns a ``TuneResult``: ``settings`` (``accel.patch`` keywords), ``label``, ``budget``,
    ``rows``, ``front``, ``chosen``, ``held_out``, ``held_out_within_budget``, ``measured``."""
    from .plot import front_rows

    settings = settings if settings is not None else candidates(model)
    cache = Path(cache) if cache is not None else default_cache()
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    calibration, held_out = stored.setdefault("calibration", {}), stored.setdefault("held-out", {})
    missing = [s for s in settings if _key(context, s.label) not in calibration]
    if missing:
        log(f"tune: measuring {len(missing)} of {len(settings)} settings ({len(settings) - len(missing)} cached)")
        for row in measure(missing, "calibration"):
            calibration[_key(context, row["settings"])] = row
        if write:
            _save(cache, stored)
    else:
        log(f"tune: all {len(settings)} settings cached in {cache}")
    rows = [calibration[_key(context, s.label)] for s in settings]
    for row in rows:
        row["within_budget"] = budget.met(row)
    chosen = choose(rows, budget)
    front = [r["settings"] for r in front_rows(rows, y=budget.metric, higher_is_better=budget.higher_is_better)]
    setting = next(s for s in settings if s.label == chosen["settings"])
    key = _key(context, setting.label)
    if key not in held_out:
        held_out[key] = [r for r in measure([setting], "held-out") if r["settings"] == setting.label][0]
        if write:
            _save(cache, stored)
    held = held_out[key]
    return TuneResult({"settings": dict(setting.methods), "label": setting.label, "budget": str(budget),
            "metric": budget.metric, "rows": rows, "front": front, "chosen": chosen, "held_out": held,
            "held_out_within_budget": budget.met(held), "measured": len(missing)})
