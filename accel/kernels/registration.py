"""A Triton kernel as a torch custom op, built on first use, once per interpreter setting.

On CUDA the op is a ``triton_op`` (Inductor sees the kernel; the fake implementation comes from the
Python body); in Triton's CPU interpreter, whose kernels cannot run on fake tensors, an opaque
``custom_op`` with a registered fake. Either way ``torch.compile`` traces through the call instead
of breaking the graph, once the op exists: it is built outside any graph, on the first call.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

__all__ = ["KernelOp"]


class KernelOp:
    """``KernelOp(name, schema, kernel, launch, fake)``: ``schema`` the op's signature
    (``"(Tensor a, Tensor b) -> (Tensor, Tensor)"``), ``kernel()`` the plain kernel function (its
    module imports Triton), ``launch(jitted, *args)`` allocates the outputs and launches, and
    ``fake(*args)`` returns empty outputs of the right shapes. ``op(*args)`` runs it."""

    def __init__(self, name: str, schema: str, kernel: Callable[[], Any], launch: Callable[..., Any],
                 fake: Callable[..., Any]) -> None:
        self.name, self.schema, self.kernel, self.launch, self.fake = name, schema, kernel, launch, fake
        self.built: Dict[bool, Any] = {}  # TRITON_INTERPRET -> the registered op

    def __call__(self, *args: Any) -> Any:
        from .dispatch import interpreting

        interpret = interpreting()
        op = self.built.get(interpret) or self._build(interpret)
        return op(*args)

    @torch.compiler.disable
    def _build(self, interpret: bool) -> Any:
        """Outside any graph: ``triton.jit`` reads Triton's settings, which Dynamo cannot trace."""
        if interpret not in self.built:
            self.built[interpret] = self._register(interpret)
        return self.built[interpret]

    def _register(self, interpret: bool) -> Any:
        import triton
        from torch.library import custom_op, register_fake, triton_op, wrap_triton

        jitted = triton.jit(self.kernel())  # triton.jit reads TRITON_INTERPRET now
        name = f"accel::{self.name}{'_interpreted' if interpret else ''}"
        launch, fake = self.launch, self.fake

        if not interpret:
            return triton_op(name, lambda *args: launch(wrap_triton(jitted), *args), mutates_args=(),
                             schema=self.schema)
        op = custom_op(name, lambda *args: launch(jitted, *args), mutates_args=(), schema=self.schema)
        register_fake(name)(fake)
        return op
