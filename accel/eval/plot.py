"""Report plots as PNG files, drawn with matplotlib (the ``eval`` extra).

Each function builds its own ``Figure`` on an Agg canvas: no pyplot, so no global figure state and
no display is needed (servers, CI, threads). matplotlib is imported inside the functions so that
``import accel`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["pareto_front", "front_rows", "tradeoff_plot", "line_plot", "DPI", "FIGSIZE"]

# Colour-blind-safe palette (Okabe & Ito): black, orange, sky blue, bluish green, vermillion,
# blue, reddish purple, yellow.
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
FIGSIZE = (6.4, 4.2)  # inches; at DPI a PNG of 768 x 504 pixels
DPI = 120

PathLike = Union[str, Path]


def pareto_front(xs: Sequence[float], ys: Sequence[float], *,
                 maximize: Tuple[bool, bool] = (True, True)) -> List[int]:
    """Indices of the non-dominated points, sorted by x (then index).

    A point is dominated when another is at least as good in both coordinates and strictly better
    in one; equal points do not dominate each other, so duplicates on the front are all kept.
    ``maximize`` says per coordinate whether higher is better (speedup: yes; FID: no).
    """
    if len(xs) != len(ys):
        raise ValueError(f"pareto_front: xs and ys differ in length ({len(xs)} != {len(ys)})")
    # Flip signs so that higher is better in both; O(n^2) is fine for a report's tens of rows.
    px = [x if maximize[0] else -x for x in xs]
    py = [y if maximize[1] else -y for y in ys]

    def dominated(i: int) -> bool:
        return any(px[j] >= px[i] and py[j] >= py[i] and (px[j] > px[i] or py[j] > py[i])
                   for j in range(len(px)))

    return sorted((i for i in range(len(px)) if not dominated(i)), key=lambda i: (xs[i], i))


def _has(row: Dict[str, Any], key: str) -> bool:
    return row.get(key) is not None


def front_rows(rows: Sequence[Dict[str, Any]], *, y: str, x: str = "speedup",
               higher_is_better: bool = True) -> List[Dict[str, Any]]:
    """The rows on the Pareto front of ``x`` (higher better) against ``y``, sorted by x; rows
    missing either value (the unpatched baseline has no quality of its own) are left out."""
    kept = [row for row in rows if _has(row, x) and _has(row, y)]
    front = pareto_front([row[x] for row in kept], [row[y] for row in kept], maximize=(True, higher_is_better))
    return [kept[i] for i in front]


def _new_axes() -> Tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A fixed figure size (no bbox_inches="tight") keeps every PNG the same pixel size.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


LABEL_ALL = 10  # points a trade-off plot labels all of; beyond, labels would overlap


def tradeoff_plot(rows: Sequence[Dict[str, Any]], path: PathLike, *, y: str, ylabel: str, title: str,
                  x: str = "speedup", xlabel: str = "speedup over unpatched (x)", higher_is_better: bool = True,
                  label: str = "settings", interval: Optional[Tuple[str, str]] = None,
                  budget: Optional[float] = None, chosen: Optional[str] = None) -> Path:
    """Quality ``row[y]`` against ``row[x]`` as a PNG at ``path``: one point per row, annotated with
    ``row[label]`` (beyond ``LABEL_ALL`` points only the front's and the chosen one, so that they
    stay legible), the Pareto front drawn as a staircase with its points ringed, a dotted line at
    x = 1 (the unpatched model). ``interval=(low_key, high_key)`` adds vertical error bars (a FID
    confidence interval); ``budget`` a dashed line at that y, ``chosen`` (a label) a star on that
    row (``accel tune``'s choice). Rows without a y (the unpatched baseline) are skipped."""
    kept = [row for row in rows if _has(row, x) and _has(row, y)]
    if not kept:
        raise ValueError(f"tradeoff_plot: no row has both {x!r} and y={y!r}")
    xs, ys = [float(row[x]) for row in kept], [float(row[y]) for row in kept]
    fig, ax = _new_axes()
    ax.axvline(1.0, color=PALETTE[0], linestyle=":", linewidth=1, label="unpatched")
    if interval is not None:
        low, high = interval
        bars = [(i, row) for i, row in enumerate(kept) if _has(row, low) and _has(row, high)]
        if bars:
            # A percentile bootstrap interval need not contain the point estimate; matplotlib refuses
            # negative error lengths, so such a side is drawn as zero.
            ax.errorbar([xs[i] for i, _ in bars], [ys[i] for i, _ in bars],
                        yerr=[[max(0.0, ys[i] - row[low]) for i, row in bars],
                              [max(0.0, row[high] - ys[i]) for i, row in bars]],
                        fmt="none", ecolor=PALETTE[2], elinewidth=1, capsize=3)
    ax.scatter(xs, ys, s=24, color=PALETTE[5], zorder=3)
    front = pareto_front(xs, ys, maximize=(True, higher_is_better))
    named = set(range(len(kept))) if len(kept) <= LABEL_ALL else set(front)
    for i, (row, px, py) in enumerate(zip(kept, xs, ys)):
        if i in named or row.get(label) == chosen:
            ax.annotate(str(row.get(label, "")), (px, py), xytext=(4, 4), textcoords="offset points", fontsize=7)
    if budget is not None:
        ax.axhline(budget, color=PALETTE[3], linestyle="--", linewidth=1, label=f"budget ({budget:g})")
    picked = [i for i, row in enumerate(kept) if chosen is not None and row.get(label) == chosen]
    if picked:
        ax.scatter([xs[i] for i in picked], [ys[i] for i in picked], s=160, marker="*", color=PALETTE[1],
                   edgecolor="black", zorder=4, label=f"chosen: {chosen}")
    # x is maximised, so the best quality reachable at speedup >= x over (x_i, x_i+1] is y_i+1: 'pre'.
    # The markers sit on the points themselves (not the corners), so they ring the front's points.
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="pre", color=PALETTE[4], linewidth=1.5,
            marker="o", markersize=10, markerfacecolor="none", markeredgewidth=1.5, label="Pareto front")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def line_plot(series: Dict[str, Sequence[Tuple[float, float]]], path: PathLike, *, title: str, xlabel: str,
              ylabel: str) -> Path:
    """Points ``(x, y)`` joined by lines as a PNG at ``path``: one series per name, in the order
    given, each sorted by x, with a legend."""
    if not any(len(points) for points in series.values()):
        raise ValueError("line_plot: no points to plot")
    fig, ax = _new_axes()
    for i, (name, points) in enumerate(series.items()):
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, linewidth=1.5,
                color=PALETTE[i % len(PALETTE)], label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
