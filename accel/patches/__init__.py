"""One package per method; inside each, the pure algorithm apart from each framework adapter.

Each method package declares its ``Method`` (``METHOD``); the list below is the one place the
built-in methods are registered, in the order ``accel.available_methods()`` lists them. A new
method is its own package plus one name here.
"""
from __future__ import annotations

import importlib

from . import registry

METHOD_PACKAGES = ("tome", "deepcache", "avit", "evit", "early_exit", "token_exit", "region_cache", "speculative")

for _name in METHOD_PACKAGES:
    registry.register(importlib.import_module(f"{__name__}.{_name}").METHOD)
