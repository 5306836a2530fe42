"""Dispatch: method name -> config -> the adapter for this model family; atomic apply and undo.

The patches applied to an object live on it as ``obj._accel_patches`` ({method: MethodPatch},
in the order applied); the attribute is removed with the last patch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from .families import family, is_compiled_module, is_timm_vit
from .patches.base import MethodPatch
from .patches.avit import AViT
from .patches.avit import timm as avit_timm
from .patches.deepcache import DeepCache
from .patches.deepcache import unet as deepcache_unet
from .patches.early_exit import EarlyExit
from .patches.early_exit import timm as early_exit_timm
from .patches.evit import EViT
from .patches.evit import timm as evit_timm
from .patches.region_cache import RegionCache
from .patches.region_cache import diffusers as region_cache_diffusers
from .patches.tome import ToMe
from .patches.tome import diffusers as tome_diffusers
from .patches.tome import timm as tome_timm
from .patches.token_exit import TokenExit
from .patches.token_exit import timm as token_exit_timm

__all__ = ["patch", "unpatch", "patched", "describe", "get_patch", "available_methods"]

_RECORDS_ATTR = "_accel_patches"


@dataclass(frozen=True)
class Adapter:
    """One model family a method supports."""

    matches: Callable[[Any], bool]
    build: Callable[[Any, Any], MethodPatch]
    supports: str


@dataclass(frozen=True)
class Method:
    coerce: Callable[[Any], Any]  # shorthand value or config -> config (TypeError/ValueError)
    adapters: Tuple[Adapter, ...]


# Adapters import no framework at module level (they check ``sys.modules``), so importing them
# here keeps ``import accel`` framework-free.
_METHODS: Dict[str, Method] = {
    "tome": Method(ToMe.coerce, (
        Adapter(is_timm_vit, tome_timm.ToMeTimm, tome_timm.SUPPORTED),
        Adapter(tome_diffusers.matches, tome_diffusers.ToMeDiffusers, tome_diffusers.SUPPORTED),
    )),
    "deepcache": Method(DeepCache.coerce, (
        Adapter(deepcache_unet.matches, deepcache_unet.DeepCacheUNet, deepcache_unet.SUPPORTED),
    )),
    "avit": Method(AViT.coerce, (Adapter(is_timm_vit, avit_timm.AViTTimm, avit_timm.SUPPORTED),)),
    "evit": Method(EViT.coerce, (Adapter(is_timm_vit, evit_timm.EViTTimm, evit_timm.SUPPORTED),)),
    "early_exit": Method(EarlyExit.coerce, (
        Adapter(is_timm_vit, early_exit_timm.EarlyExitTimm, early_exit_timm.SUPPORTED),
    )),
    "token_exit": Method(TokenExit.coerce, (
        Adapter(is_timm_vit, token_exit_timm.TokenExitTimm, token_exit_timm.SUPPORTED),
    )),
    "region_cache": Method(RegionCache.coerce, (
        Adapter(region_cache_diffusers.matches, region_cache_diffusers.RegionCacheDiT,
                region_cache_diffusers.SUPPORTED),
    )),
}

# Each of these decides which tokens (or images) a model's blocks compute, assuming it alone does:
# two of them on one model do not compose, so patching a second one raises instead of giving
# silently wrong results.
_EXCLUSIVE = frozenset({"tome", "avit", "evit", "token_exit", "early_exit", "region_cache"})


def available_methods() -> Tuple[str, ...]:
    return tuple(_METHODS)


def _records(obj: Any) -> Dict[str, MethodPatch]:
    return getattr(obj, "__dict__", {}).get(_RECORDS_ATTR, {})


def _set_record(obj: Any, name: str, patch_: Optional[MethodPatch]) -> None:
    records = dict(_records(obj))
    if patch_ is None:
        records.pop(name, None)
    else:
        records[name] = patch_
    if records:
        object.__setattr__(obj, _RECORDS_ATTR, records)
    elif _RECORDS_ATTR in vars(obj):
        object.__delattr__(obj, _RECORDS_ATTR)


def get_patch(obj: Any, method: str) -> Optional[MethodPatch]:
    """The installed patch of ``method`` on ``obj``, or None."""
    return _records(obj).get(method)


def _check_method_names(names: Any, caller: str) -> None:
    for name in names:
        if name not in _METHODS:
            raise ValueError(
                f"accel.{caller}: unknown method {name!r}; available: {', '.join(sorted(_METHODS))}"
            )


def _check_exclusive(obj: Any, methods: Dict[str, Any]) -> None:
    wanted = (set(_records(obj)) | set(methods)) & _EXCLUSIVE
    if len(wanted) > 1:
        on = ", ".join(sorted(set(_records(obj)) & _EXCLUSIVE)) or "nothing"
        raise ValueError(
            f"accel.patch: {', '.join(sorted(wanted))} each decide which tokens the blocks of "
            f"{family(obj)} compute and do not compose; patch one of them (already patched: {on})"
        )


def _build(name: str, obj: Any, value: Any) -> MethodPatch:
    method = _METHODS[name]
    config = method.coerce(value)
    for adapter in method.adapters:
        if adapter.matches(obj):
            patch_ = adapter.build(obj, config)
            patch_.method = name
            return patch_
    supported = "; ".join(a.supports for a in method.adapters)
    raise TypeError(f"{name}: {family(obj)} is not supported; supported: {supported}")


def patch(obj: Any, **methods: Any) -> Any:
    """Apply methods to ``obj`` in place and return it: ``accel.patch(vit, tome=16)``.

    Each keyword is a method name with a config object or a shorthand value. Atomic: if any
    method fails to apply, ``obj`` is left exactly as it was (settings replaced by this call
    come back too). Patching a method again replaces its settings; different methods compose.
    """
    if is_compiled_module(obj):
        raise TypeError("accel.patch: patch the model first, then torch.compile it (got a compiled module)")
    if not methods:
        raise ValueError(
            f"accel.patch: name at least one method, e.g. tome=16; available: {', '.join(sorted(_METHODS))}"
        )
    _check_method_names(methods, "patch")
    _check_exclusive(obj, methods)
    new = {name: _build(name, obj, value) for name, value in methods.items()}  # validates; no change yet

    before = dict(_records(obj))
    installed = []
    try:
        for name, patch_ in new.items():
            if name in before:
                before[name].uninstall()
                _set_record(obj, name, None)
            patch_.install()
            installed.append(name)
            _set_record(obj, name, patch_)
    except BaseException:
        for name in reversed(installed):
            new[name].uninstall()
            _set_record(obj, name, None)
        for name, old in before.items():
            if name in new:
                old.install()
                _set_record(obj, name, old)
        raise
    return obj


def unpatch(obj: Any, *methods: str) -> Any:
    """Remove the named methods (all when none is named); outputs are bit-exact original again."""
    _check_method_names(methods, "unpatch")
    records = _records(obj)
    for name in methods:
        if name not in records:
            patched_names = ", ".join(records) or "nothing"
            raise ValueError(f"accel.unpatch: {name} is not patched on {family(obj)} (patched: {patched_names})")
    for name in reversed(list(records)):
        if not methods or name in methods:
            records[name].uninstall()
            _set_record(obj, name, None)
    return obj


@contextlib.contextmanager
def patched(obj: Any, **methods: Any) -> Iterator[Any]:
    """``with accel.patched(model, tome=16): ...``: patched inside, as before outside."""
    before = dict(_records(obj))
    patch(obj, **methods)
    ours = {name: _records(obj)[name] for name in methods}
    try:
        yield obj
    finally:
        for name, patch_ in ours.items():
            if _records(obj).get(name) is patch_:  # not already unpatched or replaced inside the block
                patch_.uninstall()
                _set_record(obj, name, None)
                if name in before:
                    before[name].install()
                    _set_record(obj, name, before[name])


def describe(obj: Any) -> Dict[str, Any]:
    """What is patched where, with which settings, and what each method did in the last call."""
    return {
        "object": family(obj),
        "methods": {name: patch_.describe() for name, patch_ in _records(obj).items()},
    }
