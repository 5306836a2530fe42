"""Unmerging: every token merged away takes its destination's value again (ToMe for SD, Bolya &
Hoffman 2023, Sec. 4: merge -> op -> unmerge, so a block's output keeps all its tokens).

    out = unmerge(x, protected, unm_idx, src_idx, dst_idx)               # [B, N - r, C] -> [B, N, C]
    out = unmerge2d(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)          # ToMe-SD's grid layout

The merged layout (``weighted_merge``, ``mean_merge``): the ``protected`` tokens, the kept A tokens
in ``unm_idx`` order, then the B tokens. ``unmerge`` puts A token ``i`` back at ``protected + 2i``
and B token ``j`` at ``protected + 2j + 1`` (ToMe's alternating split); ``unmerge2d`` at the grid
positions ``a_idx[0, i]`` and ``b_idx[0, j]`` (shared by the batch, no protected tokens).

The references take a gather, a new tensor and three or four writes; the Triton kernel is one
launch in which each output row is a copy of exactly one merged row, so it is bit-equal to the
reference in every dtype. It needs no preparation on the device: the programs walk the merged rows
with the merged-away sources inserted, each knowing where its row goes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .dispatch import select
from .merging import check_match, expand_rows
from .registration import KernelOp

__all__ = ["unmerge", "unmerge2d", "unmerge_reference", "unmerge2d_reference", "unmerge_triton",
           "unmerge2d_triton"]

ROWS = 4  # output rows per program: a [4, BLOCK_C] tile


def unmerge_reference(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                      dst_idx: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``[B, N - r, C] -> [B, N, C]``."""
    p, n_unm = protected, unm_idx.shape[1]
    head, unm, b = x[:, :p], x[:, p:p + n_unm], x[:, p + n_unm:]
    batch, c = x.shape[0], x.shape[-1]
    src = b.gather(1, expand_rows(dst_idx, c))
    out = x.new_empty(batch, x.shape[1] + src_idx.shape[1], c)
    out[:, :p] = head
    rest = out[:, p:]
    rest[:, 1::2] = b
    # A token i sits at position 2*i of the unprotected part.
    rest.scatter_(1, expand_rows(2 * unm_idx, c), unm)
    rest.scatter_(1, expand_rows(2 * src_idx, c), src)
    return out


def unmerge2d_reference(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                        src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``[B, N - r, C] -> [B, N, C]`` on the grid positions ``a_idx``/``b_idx: [1, *]``."""
    batch, _, c = x.shape
    n_unm = unm_idx.shape[1]
    unm, b = x[:, :n_unm], x[:, n_unm:]
    src = b.gather(1, expand_rows(dst_idx, c))
    a_idx = a_idx.expand(batch, -1)
    out = x.new_empty(batch, x.shape[1] + src_idx.shape[1], c)
    out.scatter_(1, expand_rows(b_idx.expand(batch, -1), c), b)
    out.scatter_(1, expand_rows(a_idx.gather(1, unm_idx), c), unm)
    out.scatter_(1, expand_rows(a_idx.gather(1, src_idx), c), src)
    return out


def _kernel() -> Any:
    from .unmerging_triton import unmerge_kernel

    return unmerge_kernel


def _run(op: KernelOp, x: torch.Tensor, a_idx: Optional[torch.Tensor], b_idx: Optional[torch.Tensor],
         protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    import triton

    batch, num_merged, c = x.shape
    n = num_merged + src_idx.shape[1]
    out = x.new_empty(batch, n, c)
    unm_idx, src_idx, dst_idx = unm_idx.contiguous(), src_idx.contiguous(), dst_idx.contiguous()
    grid_layout = a_idx is not None
    a_idx = a_idx.contiguous() if grid_layout else unm_idx  # unread without the grid layout
    b_idx = b_idx.contiguous() if grid_layout else unm_idx
    op.jit()[(batch, triton.cdiv(n, ROWS))](
        x.contiguous(), a_idx, b_idx, unm_idx, src_idx, dst_idx, out, num_merged, n, c, protected,
        unm_idx.shape[1], src_idx.shape[1], GRID=grid_layout, ROWS=ROWS, BLOCK_C=triton.next_power_of_2(c))
    return out


def _launch(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
            dst_idx: torch.Tensor) -> torch.Tensor:
    return _run(_OP, x, None, None, protected, unm_idx, src_idx, dst_idx)


def _fake(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
          dst_idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] + src_idx.shape[1], x.shape[2])


def _launch2d(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
              src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    return _run(_OP2D, x, a_idx, b_idx, 0, unm_idx, src_idx, dst_idx)


def _fake2d(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
            src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] + src_idx.shape[1], x.shape[2])


_OP = KernelOp("unmerge", _kernel, _launch, _fake)
_OP2D = KernelOp("unmerge2d", _kernel, _launch2d, _fake2d)


def unmerge_triton(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor,
                   dst_idx: torch.Tensor) -> torch.Tensor:
    """The one-launch kernel: each output row copied from one merged row."""
    return _OP(x, protected, unm_idx, src_idx, dst_idx)


def unmerge2d_triton(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
                     src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """The one-launch kernel on the grid layout."""
    return _OP2D(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)


def unmerge(x: torch.Tensor, protected: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
            *, backend: Optional[str] = None) -> torch.Tensor:
    """Undo a bipartite merge: ``x: [B, N - r, C]`` (protected tokens, kept A tokens, B tokens) ->
    ``[B, N, C]``, each token merged away (``src_idx [B, r]``) taking the value of its destination
    (``dst_idx [B, r]``), A token ``i`` at ``protected + 2i``, B token ``j`` at ``protected + 2j + 1``."""
    check_match("unmerge", x, unm_idx, src_idx, dst_idx)
    if protected < 0 or protected + unm_idx.shape[1] > x.shape[1]:
        raise ValueError(f"unmerge: protected must be in [0, {x.shape[1] - unm_idx.shape[1]}] for "
                         f"{x.shape[1]} merged tokens with {unm_idx.shape[1]} kept A tokens; got {protected}")
    if select("unmerge", x, backend) == "triton":
        return unmerge_triton(x, protected, unm_idx, src_idx, dst_idx)
    return unmerge_reference(x, protected, unm_idx, src_idx, dst_idx)


def unmerge2d(x: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, unm_idx: torch.Tensor,
              src_idx: torch.Tensor, dst_idx: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Undo ToMe-SD's grid merge: ``x: [B, N - r, C]`` (kept sources, then destinations) -> ``[B, N, C]``,
    source ``i`` at grid position ``a_idx[0, i]``, destination ``j`` at ``b_idx[0, j]`` (``[1, Na]``,
    ``[1, Nb]``, shared by the batch); merged sources take their destination's value."""
    check_match("unmerge2d", x, unm_idx, src_idx, dst_idx)
    for name, index in (("a_idx", a_idx), ("b_idx", b_idx)):
        if index.ndim != 2 or index.shape[0] != 1 or index.dtype != torch.int64:
            raise ValueError(f"unmerge2d: {name} must be int64 [1, *] (shared by the batch); got "
                             f"{index.dtype} {tuple(index.shape)}")
    if b_idx.shape[1] + unm_idx.shape[1] != x.shape[1] or unm_idx.shape[1] + src_idx.shape[1] != a_idx.shape[1]:
        raise ValueError(f"unmerge2d: x has {x.shape[1]} tokens, expected len(unm_idx) + len(b_idx) = "
                         f"{unm_idx.shape[1] + b_idx.shape[1]} with len(unm_idx) + len(src_idx) = len(a_idx) "
                         f"({unm_idx.shape[1]} + {src_idx.shape[1]} vs {a_idx.shape[1]})")
    if select("unmerge2d", x, backend) == "triton":
        return unmerge2d_triton(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)
    return unmerge2d_reference(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)
