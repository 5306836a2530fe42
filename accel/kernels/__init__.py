"""Tensor ops shared by methods, each a plain-torch reference and a Triton kernel behind one dispatcher.

    best, index = accel.kernels.best_match(a, b)                  # the backend chosen for a's device
    accel.kernels.best_match(a, b, backend="torch")               # or ACCEL_KERNELS=torch|triton
    accel.kernels.last_backend("best_match")                      # "torch" or "triton": what ran

Patches call these functions, never a kernel directly; this package imports no patch, and no
Triton until a kernel first runs. See ``dispatch`` for how the backend is chosen.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import BACKENDS, last_backend, record, select
from .matching import best_match_reference, best_match_triton, unit_rows

__all__ = ["best_match", "last_backend", "unit_rows", "BACKENDS"]


def best_match(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a: [B, Na, C]``, the most similar row of ``b: [B, Nb, C]`` (cosine
    similarity; ties to the lower index): ``best [B, Na]`` and ``index [B, Na]`` (int64). The
    Triton kernel returns ``best`` in float32, the reference in ``a``'s dtype."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"best_match: expected a [B, Na, C] and b [B, Nb, C]; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if b.shape[1] == 0:
        raise ValueError("best_match: b has no rows to match to")
    chosen = select("best_match", a, backend)
    record("best_match", chosen)
    if chosen == "triton":
        return best_match_triton(a, b)
    return best_match_reference(a, b)
