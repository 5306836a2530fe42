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
from .patches import avit, deepcache, early_exit, evit, region_cache, token_exit, tome
from .patches.avit import AViT
from .patches.deepcache import DeepCache
from .patches.early_exit import EarlyExit
from .patches.evit import EViT
from .patches.region_cache import RegionCache
from .patches.token_exit import TokenExit
from .patches.tome import ToMe

__version__ = "0.1.0"

# ``from accel.tome import ...`` works like ``accel.tome.<name>``: each method's package is
# reachable from the top (DESIGN.md, section 1).
for _package in (tome, deepcache, avit, evit, early_exit, token_exit, region_cache):
    _sys.modules[__name__ + "." + _package.__name__.rsplit(".", 1)[1]] = _package

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "describe",
    "available_methods",
    "ToMe",
    "tome",
    "DeepCache",
    "deepcache",
    "AViT",
    "avit",
    "EViT",
    "evit",
    "EarlyExit",
    "early_exit",
    "TokenExit",
    "token_exit",
    "RegionCache",
    "region_cache",
    "__version__",
]
