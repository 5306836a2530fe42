"""A linear layer over a few rows, as the CPU computes it fastest: the weight on the left.

    y = few_rows_linear(x, weight, bias)      # = F.linear(x, weight, bias), up to rounding

Decoding runs a model's linear layers on one row per sequence, and speculative decoding's
verification on a handful. On the CPU, torch's ``F.linear`` computes ``x @ weight^T`` through MKL,
whose paths for one row (a matrix-vector product) and for a few rows are slow: on the machine
measured, its matrix-vector product over SmolLM2's weights ran no faster on two threads than on
one. The same product taken the other way round, ``(weight @ x^T)^T``, is a matrix product with
thousands of rows and a few columns, which MKL runs fast. One row is padded to two, since a single
column falls back to the matrix-vector path, and 9 to 15 rows to 16: MKL's product costs steps,
not a slope, in the columns. Measured for SmolLM2's ``[1536, 576]`` weight: 8, 12, 14 and 16
columns take 166, 252, 353 and 170 us; its ``[49152, 576]`` output layer, 13.5 ms for 12 columns
against 10.6 for 16.

Measured on this project's 2-core x86_64 CPU (torch 2.14.1, MKL 2024.2; ``python
scripts/bench_llm.py --costs``, docs/benchmarks.md): a pass of SmolLM2-135M over 1, 2, 4 and 5
positions after 200 tokens takes 39.9, 64.4, 53.8 and 54.1 ms with ``F.linear`` and 29.0, 29.0,
31.5 and 40.0 ms this way; over 16 positions the two are level, and over more ``F.linear`` is
level or faster (over 40 positions 100.0 against 107.7 ms; 8 rows of 3 positions, 82.7 against
88.6), hence ``FEW_ROWS = 16``. So this op is written by hand rather than left to torch: it is
measurably faster where decoding runs. Other CPUs and BLAS libraries may differ; the callers
let it be turned off (``few_rows=False``).

It applies to CPU tensors of float32 or float64 over 1 to ``FEW_ROWS`` rows; anything else (CUDA,
half precision, more rows) is ``F.linear`` itself. The result equals ``F.linear``'s up to the
order of the sums (tested against it), as any change of matrix shape does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["few_rows_linear", "FEW_ROWS", "takes_few_rows", "weight_left_linear"]

FEW_ROWS = 16  # the gain shrinks with the rows: 1.3-2.2x up to 7, none at 16, a loss at 24 and 40
BLOCK = 8  # more rows than this are padded with zero rows to a multiple of it


def takes_few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``few_rows_linear`` computes ``x`` by the weight-on-the-left product (else
    ``F.linear``): CPU, float32 or float64 (both the same), 1 to ``FEW_ROWS`` rows."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and weight.ndim == 2 and x.numel() > 0
            and x.numel() // x.shape[-1] <= FEW_ROWS)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x: [..., in]``, ``weight: [out, in]``: computed as
    ``(weight @ x^T)^T`` where ``takes_few_rows``, one row padded to two."""
    if not takes_few_rows(x, weight):
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"few_rows_linear: x's last dimension ({x.shape[-1]}) must equal weight's input width "
                         f"({weight.shape[1]})")
    return weight_left_linear(x, weight, bias)


def weight_left_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The product itself, for a caller that has asked ``takes_few_rows`` already (a layer's hook on
    the decoding path, called hundreds of times a step, checks once)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.repeat(2, 1)  # one column would take the matrix-vector path again (a broadcast view too)
    elif rows > BLOCK and rows % BLOCK:  # MKL runs whole blocks of columns fastest: 12 columns cost 1.5x 16
        flat = torch.cat([flat, flat.new_zeros(BLOCK - rows % BLOCK, flat.shape[1])])
    out = torch.mm(weight, flat.t())[:, :rows].t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
