"""A Triton kernel as a torch custom op, built on first use, once per interpreter setting.

On CUDA the op is a ``triton_op`` (Inductor sees the kernel; the fake implementation comes from the
Python body); in Triton's CPU interpreter, whose kernels cannot run on fake tensors, an opaque
``custom_op`` with a registered fake. Either way ``torch.compile`` traces through the call instead
of breaking the graph, once the op exists: it is built outside any graph, on the first call.

The op's schema is inferred from the annotated signature of ``launch`` (torch 2.11's ``triton_op``
takes no explicit schema), so ``launch`` names its arguments and types them.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

from .dispatch import interpreting

__all__ = ["KernelOp"]


def _wrap_triton_enabled(enabled: bool) -> Any:
    """torch's switch between tracing a wrapped Triton kernel and launching it (what ``triton_op``
    sets around its own body); a no-op context where this torch has none."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return set_wrap_triton_enabled(enabled)


class KernelOp:
    """``KernelOp(name, kernel, launch, fake)``: ``kernel()`` returns the plain kernel function (its
    module imports Triton); ``launch(...)``, with typed arguments (tensors, ints, floats), allocates
    the outputs and launches ``op.jit()[grid](...)``; ``fake(...)``, with the same arguments,
    returns empty outputs of the right shapes. ``op(...)`` runs it."""

    ALL: List["KernelOp"] = []  # every op defined, for tests that check all kernels

    def __init__(self, name: str, kernel: Callable[[], Any], launch: Callable[..., Any],
                 fake: Callable[..., Any]) -> None:
        self.name, self.kernel, self.launch, self.fake = name, kernel, launch, fake
        KernelOp.ALL.append(self)
        self.built: Dict[bool, Any] = {}  # TRITON_INTERPRET -> the registered op
        self.jitted: Dict[bool, Any] = {}  # TRITON_INTERPRET -> the triton.jit kernel
        self.wrapped: Any = None  # wrap_triton of the CUDA kernel
        self.direct: Optional[bool] = None  # eager launches bypass the op (None: not tried yet)

    def __call__(self, *args: Any) -> Any:
        interpret = interpreting()
        op = self.built.get(interpret) or self._build(interpret)
        if self.direct is not False and not interpret and not torch.compiler.is_compiling():
            # eager on a GPU: launch directly, as the op itself does inside. Its dispatch costs tens of
            # microseconds of CPU per call, longer than the kernel at ViT sizes (docs/kernels.md).
            try:
                with _wrap_triton_enabled(False):
                    return self.launch(*args)
            except Exception as error:  # a torch whose wrapper will not launch outside tracing
                if self.direct is not None:
                    raise
                warnings.warn(f"accel.kernels.{self.name}: launching outside the custom op failed ({error}); "
                              f"going through it from now on", RuntimeWarning)
                self.direct = False
                return op(*args)
            finally:
                if self.direct is None:
                    self.direct = True  # the first direct launch worked: no more fallbacks
        return op(*args)

    def jit(self) -> Any:
        """The kernel for ``launch`` to index with its grid: wrapped for ``triton_op`` on CUDA (a plain
        launch outside tracing), the plain jitted kernel in the interpreter."""
        if interpreting():
            return self.jitted[True]
        return self.wrapped

    @torch.compiler.disable
    def _build(self, interpret: bool) -> Any:
        """Outside any graph: ``triton.jit`` reads Triton's settings, which Dynamo cannot trace."""
        if interpret not in self.built:
            self.built[interpret] = self._register(interpret)
        return self.built[interpret]

    def _register(self, interpret: bool) -> Any:
        import triton
        from torch.library import custom_op, register_fake, triton_op, wrap_triton

        self.jitted[interpret] = triton.jit(self.kernel())  # triton.jit reads TRITON_INTERPRET now
        name = f"accel::{self.name}{'_interpreted' if interpret else ''}"
        if not interpret:
            self.wrapped = wrap_triton(self.jitted[False])
            return triton_op(name, self.launch, mutates_args=())
        op = custom_op(name, self.launch, mutates_args=())
        register_fake(name)(self.fake)
        return op
