"""Plots as standalone SVG text: no plotting library needed, and the files render on GitHub."""
from __future__ import annotations

import math
from html import escape
from typing import Dict, List, Sequence, Tuple

__all__ = ["scatter_svg"]

# Colour-blind-safe palette (Okabe & Ito).
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")


def _ticks(low: float, high: float, count: int = 5) -> List[float]:
    """Round tick values covering [low, high]."""
    span = high - low or abs(high) or 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def scatter_svg(series: Dict[str, Sequence[Tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
                width: int = 640, height: int = 420) -> str:
    """Points joined by lines, one series per name (in the order given, each sorted by x)."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("scatter_svg: no points to plot")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    pad_x, pad_y = 0.05 * ((max(xs) - min(xs)) or 1.0), 0.05 * ((max(ys) - min(ys)) or 1.0)
    x0, x1, y0, y1 = min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y
    left, right, top, bottom = 70, 170, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + plot_w / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for x in _ticks(x0, x1):
        out.append(f'<line x1="{sx(x):.1f}" y1="{top + plot_h}" x2="{sx(x):.1f}" y2="{top + plot_h + 5}" stroke="#444"/>')
        out.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{x:g}</text>')
    for y in _ticks(y0, y1):
        out.append(f'<line x1="{left - 5}" y1="{sy(y):.1f}" x2="{left}" y2="{sy(y):.1f}" stroke="#444"/>')
        out.append(f'<text x="{left - 8}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(values)
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{colour}"/>' for x, y in pts]
        ly = top + 14 + 18 * i
        out.append(f'<circle cx="{left + plot_w + 16}" cy="{ly - 4}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{left + plot_w + 26}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
