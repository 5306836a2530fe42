"""Denoising steps of a pipeline call, counted the same way by every method that needs them
(DeepCache, RegionCache): one step per ``scheduler.step`` of the pipeline's loop, with no read of
the timestep back to the host."""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from ..hooks import add_hook

__all__ = ["call_counting_steps"]


def call_counting_steps(state: Any, pipe: Any, call_next: Callable[..., Any], on_step: Callable[..., Any],
                        args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Run one top-level pipeline call with ``on_step`` hooked on the scheduler's ``step``.

    ``state`` (the method's per-call state: ``reset()``, ``free()``, ``in_call``) is reset first and
    its cached tensors freed after (the report stays). The scheduler hooked is the one the
    pipeline holds now: it may have been replaced after patching. A nested call (a pipeline that
    calls itself) is part of the running one.
    """
    if state is None or state.in_call:
        return call_next(*args, **kwargs)
    state.reset()
    state.in_call = True
    handle = add_hook(pipe.scheduler, on_step, "step")
    try:
        return call_next(*args, **kwargs)
    finally:
        handle.remove()
        state.in_call = False
        state.free()
