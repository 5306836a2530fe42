"""accel: dynamic inference for the models you already have, in one line.

    import accel
    accel.patch(vit, tome=16)                       # shorthand value
    accel.patch(vit, tome=accel.ToMe(r=16, prop_attn=True))
    with accel.patched(vit, tome=8):
        logits = vit(images)
    accel.describe(vit)                             # what is patched where, and what it did
    accel.unpatch(vit)                              # bit-exact original behaviour again
"""
from __future__ import annotations

import sys as _sys

from .api import available_methods, describe, patch, patched, unpatch
from .patches.base import MethodPatch
from .patches.registry import Method, methods as _methods, register, unregister

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "patched", "describe", "available_methods", "register", "unregister", "Method",
           "MethodPatch", "__version__"]

# Each registered method is reachable from the top, derived from the registry so a new method
# needs no edit here: its config class (``accel.ToMe``) and its package for its own helpers
# (``accel.tome.get_source``), which ``from accel.tome import ...`` also finds.
for _method in _methods():
    if _method.package is not None:
        _package = _sys.modules[_method.package]
        globals()[_method.name] = _package
        _sys.modules[f"{__name__}.{_method.name}"] = _package
        __all__.append(_method.name)
    globals()[_method.config.__name__] = _method.config
    __all__.append(_method.config.__name__)
del _method, _package
