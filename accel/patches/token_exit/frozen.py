"""Bookkeeping of per-token early exit on tensors (after SACT, Figurnov et al., CVPR 2017).
Knows tensors only. Shapes: ``x: [B, N, C]``, masks ``[B, N]`` (True = still active)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["relative_update", "active_first", "exits"]


def relative_update(x_out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """``||x_out - x_in|| / ||x_in||`` per token, in float32: ``[B, N]``."""
    x_in = x_in.float()
    return (x_out.float() - x_in).norm(dim=-1) / x_in.norm(dim=-1).clamp_min(1e-12)


def active_first(active: torch.Tensor, longest: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image, the positions of the active tokens (ascending), padded to the batch's largest
    count with frozen positions: ``order: [B, Q]`` and ``valid: [B, Q]`` (True on real ones).

    ``Q`` (``longest``, the largest count) is data-dependent: counted here (one host sync) unless
    given. Rows ``valid`` in (image, position) order are exactly ``x[active]``'s rows, so packed
    and padded layouts convert by compaction (``accel.kernels.compaction.compact_tokens``).
    """
    counts = active.sum(dim=1)  # [B]
    q = int(counts.max()) if longest is None else longest
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :q]
    valid = torch.arange(q, device=active.device)[None, :] < counts[:, None]
    return order, valid


def exits(active: torch.Tensor, update: torch.Tensor, threshold: float, num_prefix: int,
          halted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tokens that stop now: active, non-prefix, and relative update under ``threshold`` or
    (``halted: [B, N]`` bool, optional) cumulative halting score past the bar: ``[B, N]``."""
    stop = update < threshold
    if halted is not None:
        stop = stop | halted
    stop = active & stop
    stop[:, :num_prefix] = False  # prefix tokens (CLS, registers) are read by the head: always updated
    return stop
