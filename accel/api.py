"""The public calls: ``patch``, ``unpatch``, ``patched``, ``describe``.

Each keyword of ``patch`` names a registered method (``accel.patches.registry``); its value
becomes the method's config, and the method's first adapter that serves the object builds the
patch. The registry installs patches atomically, keeps their records on the objects, and sees a
pipeline and its parts as one patched object.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

from .families import family, is_compiled_module
from .patches import registry
from .patches.registry import available_methods, get_patch

__all__ = ["patch", "unpatch", "patched", "describe", "get_patch", "available_methods"]


def _build(obj: Any, methods: Dict[str, Any]) -> Dict[str, Any]:
    """{method: patch} for ``obj``: every value validated, nothing installed yet."""
    if is_compiled_module(obj):
        raise TypeError("accel.patch: patch the model first, then torch.compile it (got a compiled module)")
    if not methods:
        raise ValueError(
            f"accel.patch: name at least one method, e.g. tome=16; available: {', '.join(sorted(available_methods()))}"
        )
    chosen = {name: registry.get_method(name) for name in methods}
    return {name: chosen[name].build(obj, value) for name, value in methods.items()}


def patch(obj: Any, **methods: Any) -> Any:
    """Apply methods to ``obj`` in place and return it: ``accel.patch(vit, tome=16)``.

    Each keyword is a method name with a config object or a shorthand value. Atomic: if any
    method fails to apply, ``obj`` is left exactly as it was (settings replaced by this call
    come back too). Patching a method again replaces its settings, also when it was patched on a
    part of a pipeline (or on the pipeline holding this part); different methods compose.
    """
    registry.install(obj, _build(obj, methods))
    return obj


def unpatch(obj: Any, *methods: str) -> Any:
    """Remove the named methods (all when none is named) from ``obj`` and its parts; outputs are
    bit-exact original again."""
    present = registry.patches_on(obj)
    for name in methods:
        if name not in present:
            registry.get_method(name, "unpatch")  # an unknown name gets its own message
    registry.remove(obj, methods)
    return obj


@contextlib.contextmanager
def patched(obj: Any, **methods: Any) -> Iterator[Any]:
    """``with accel.patched(model, tome=16): ...``: patched inside, as before outside."""
    with registry.scoped(obj, _build(obj, methods)):
        yield obj


def describe(obj: Any) -> Dict[str, Any]:
    """What is patched where (on ``obj`` and its parts), with which settings, and what each method
    did in the last call."""
    methods = {}
    for key, where, patch_ in registry.located(obj):
        methods[key] = patch_.describe()
        if where:
            methods[key]["on"] = where  # patched on this part of the pipeline
    return {"object": family(obj), "methods": methods}
