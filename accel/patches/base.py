"""What every method adapter is: one method applied to one object, installable and removable."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from ..hooks import HookGroup

__all__ = ["MethodPatch", "config_dict", "in_backward"]


def in_backward() -> bool:
    """True while autograd runs a backward pass: gradient checkpointing recomputes a block's
    forward then, and the block must see the per-call state it saw in the forward pass, not the
    state the rest of the forward left. (torch has no public query for this; its own checkpoint
    code reads the same graph-task id.)"""
    if torch.compiler.is_compiling():  # a compiled graph is recomputed by the compiler, not by our hooks
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def config_dict(config: Any) -> Dict[str, Any]:
    """A config dataclass as a plain dict, for ``describe``."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


class MethodPatch:
    """Base class of the adapters: one method on one kind of object.

    A subclass says which objects it serves (``matches``, and ``SUPPORTED`` for the error that
    names them), validates everything in ``__init__`` (raising ``TypeError``/``ValueError``
    without touching the object), adds its hooks in ``_install`` through ``self.hooks`` only, and
    keeps its per-call state in ``self.state``. ``install`` is atomic: a failure half-way removes
    the hooks already added. ``install`` after ``uninstall`` works again, so a replaced patch can be
    put back.
    """

    method: str = ""
    SUPPORTED: ClassVar[str] = ""  # the objects this adapter serves, in words

    def __init__(self, target: Any, config: Any) -> None:
        self.target = target
        self.config = config
        self.hooks = HookGroup()
        self.state: Optional[Any] = None
        self.patched_modules: Dict[str, str] = {}  # qualified name -> what was hooked there

    # -- to implement -------------------------------------------------------------------------
    @classmethod
    def matches(cls, obj: Any) -> bool:
        """Whether this adapter serves ``obj`` (cheap: imports no framework)."""
        raise NotImplementedError

    def _install(self) -> None:
        raise NotImplementedError

    @classmethod
    def tune_values(cls, obj: Any) -> Tuple[Any, ...]:
        """The shorthand values ``accel tune`` tries on ``obj``, mildest first; empty when the method
        needs something trained first (exit heads, a halting fine-tune) and so cannot be searched."""
        return ()

    def last_call(self) -> Optional[Dict[str, Any]]:
        """What the method did in the most recent call, or None before the first call."""
        return None

    def covers(self) -> Tuple[Any, ...]:
        """The objects this patch changes as one: the target, and the part it hooks inside a
        pipeline (its denoiser). The patch is recorded on each, so each sees it."""
        return (self.target,)

    # -- shared -------------------------------------------------------------------------------
    def install(self) -> None:
        self.patched_modules = {}
        try:
            self._install()
        except BaseException:
            self.hooks.remove_all()
            raise
        if not self.hooks:
            raise RuntimeError(f"{self.method}: installed no hook on {type(self.target).__name__}")

    def uninstall(self) -> None:
        self.hooks.remove_all()
        self.state = None

    def describe(self) -> Dict[str, Any]:
        return {
            "settings": config_dict(self.config),
            "patched": {"count": len(self.patched_modules), "modules": dict(self.patched_modules)},
            "last_call": self.last_call(),
        }
