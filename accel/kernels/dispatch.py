"""Which implementation of an op runs: the Triton kernel or the plain-torch reference.

    backend=None (the default): Triton for CUDA tensors when Triton imports, the reference otherwise;
    ACCEL_KERNELS=torch|triton in the environment, or backend="torch"|"triton" per call, overrides.

Asking for Triton where it cannot run (no Triton, or CPU tensors without ``TRITON_INTERPRET=1``,
Triton's interpreter) is a ``ValueError`` naming what is missing; the automatic choice never
fails: without Triton it takes the reference. The kernels are forward passes: where autograd
needs the op's gradient (grad mode on and the tensor requiring it) the reference runs whatever was
asked. Every call records the backend that ran (``last_backend(op)``), so that tests and benchmarks
can assert it.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional

import torch

__all__ = ["BACKENDS", "select", "last_backend", "triton_available", "interpreting", "automatic"]

BACKENDS = ("torch", "triton")
_LAST: Dict[str, str] = {}  # op -> the backend of its latest call: a diagnostic record, not per-call state


_TRITON: Dict[str, bool] = {}  # "available" -> whether Triton imported, once asked


def triton_available() -> bool:
    """Whether Triton imports (it is not imported at ``import accel`` time). The answer is kept in
    a plain dict rather than an ``lru_cache``, which ``torch.compile`` traces through with a warning."""
    if "available" not in _TRITON:
        try:
            importlib.import_module("triton")
            _TRITON["available"] = True
        except ImportError:
            _TRITON["available"] = False
    return _TRITON["available"]


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``): how CI tests them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select(op: str, tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``op`` runs with on ``tensor``'s device: ``backend``, else ``ACCEL_KERNELS``, else
    automatic; recorded as ``op``'s latest (``last_backend``)."""
    chosen = _choose(op, tensor, backend)
    if chosen == "triton" and tensor.requires_grad and torch.is_grad_enabled():
        chosen = "torch"  # a forward-only kernel: autograd goes through the reference
    _LAST[op] = chosen
    return chosen


def _choose(op: str, tensor: torch.Tensor, backend: Optional[str]) -> str:
    asked = backend if backend is not None else os.environ.get("ACCEL_KERNELS") or None
    if asked is not None and asked not in BACKENDS:
        source = "backend" if backend is not None else "ACCEL_KERNELS"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {asked!r}")
    if asked == "torch":
        return "torch"
    if asked == "triton":
        if not triton_available():
            raise ValueError(f"accel.kernels.{op}: the Triton backend was asked for but Triton is not installed")
        if tensor.device.type != "cuda" and not interpreting():
            raise ValueError(f"accel.kernels.{op}: Triton runs on CUDA tensors, or on the CPU with TRITON_INTERPRET=1 "
                             f"(its interpreter); got a {tensor.device.type} tensor")
        return "triton"
    return "triton" if tensor.device.type == "cuda" and triton_available() else "torch"


def automatic(backend: Optional[str]) -> bool:
    """Whether the choice is left to the dispatcher (no ``backend=`` and no ``ACCEL_KERNELS``): then an
    op may keep the reference on CUDA at sizes where its kernel was measured slower."""
    return backend is None and not os.environ.get("ACCEL_KERNELS")


def last_backend(op: str) -> Optional[str]:
    """The backend ``op``'s latest call ran with (None before its first call)."""
    return _LAST.get(op)
