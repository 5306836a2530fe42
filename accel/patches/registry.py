"""The registry: which methods exist, and which patches an object carries.

The leaf every method package imports (never ``accel.api``): a package declares its ``Method``
(name, config class, adapters, whether it decides which tokens a model computes), and
``accel/patches/__init__.py`` registers the built-in ones in one list. ``register``/``unregister``
add and remove a method (a user's own, or a test's) with no edit elsewhere.

Patch records live on the patched objects as ``obj._accel_patches`` ({method: MethodPatch}, in
the order applied; removed with the last patch). A patch is recorded on every object it covers
(a pipeline and the denoiser it hooks), and a pipeline's parts are read with it, so a pipeline
and its parts are one patched object: patching either replaces the same method on the other,
``describe``/``unpatch`` of the pipeline see what was patched on its parts, and two methods that
each decide which tokens a model computes are refused whichever object and order they come in.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from ..families import family, parts
from .base import MethodPatch

__all__ = ["Method", "register", "unregister", "methods", "get_method", "available_methods", "get_patch",
           "require_patch", "located", "patches_on", "install", "remove", "scoped"]

RECORDS_ATTR = "_accel_patches"


@dataclasses.dataclass(frozen=True)
class Method:
    """One method as ``accel.patch`` knows it.

    name: the keyword of ``accel.patch`` (``tome=...``).
    config: its settings class; ``config.coerce(value)`` (``settings.Settings``) turns shorthand
        values into one; a class without ``coerce`` accepts only its own instances.
    adapters: ``MethodPatch`` subclasses, tried in order; the first whose ``matches(obj)`` holds
        builds the patch.
    decides_tokens: it decides which tokens (or images) a model's blocks compute, assuming it
        alone does; two such methods on one model are refused instead of composing wrongly.
    package: the module of the method's package, reachable as ``accel.<name>`` (None: not exposed).
    """

    name: str
    config: type
    adapters: Tuple[Type[MethodPatch], ...]
    decides_tokens: bool = False
    package: Optional[str] = None

    def coerce(self, value: Any) -> Any:
        coerce = getattr(self.config, "coerce", None)
        if coerce is not None:
            return coerce(value)
        if isinstance(value, self.config):
            return value
        raise TypeError(f"{self.name}: expected {self.config.__name__}(...); got {type(value).__name__}")

    def supported(self) -> str:
        return "; ".join(adapter.SUPPORTED for adapter in self.adapters)

    def build(self, obj: Any, value: Any) -> MethodPatch:
        """The patch of this method for ``obj`` with ``value``'s settings (nothing installed yet)."""
        config = self.coerce(value)
        for adapter in self.adapters:
            if adapter.matches(obj):
                patch = adapter(obj, config)
                patch.method = self.name
                return patch
        raise TypeError(f"{self.name}: {family(obj)} is not supported; supported: {self.supported()}")


_METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available to ``accel.patch``; ``ValueError`` if its name is taken."""
    if not isinstance(method, Method):
        raise TypeError(f"accel.register: expected an accel.Method; got {type(method).__name__}")
    if not method.name.isidentifier():
        raise ValueError(f"accel.register: a method name must be a Python identifier; got {method.name!r}")
    if method.name in _METHODS:
        raise ValueError(f"accel.register: a method named {method.name!r} is registered already")
    if not method.adapters or not all(isinstance(a, type) and issubclass(a, MethodPatch) for a in method.adapters):
        raise TypeError("accel.register: adapters must be one or more accel.MethodPatch subclasses")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove the method ``name``; patches already installed stay until unpatched."""
    if name not in _METHODS:
        raise ValueError(f"accel.unregister: no method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS.pop(name)


def methods() -> Tuple[Method, ...]:
    """The registered methods, in registration order."""
    return tuple(_METHODS.values())


def available_methods() -> Tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str, caller: str = "patch") -> Method:
    method = _METHODS.get(name)
    if method is None:
        raise ValueError(f"accel.{caller}: unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return method


# -- records on objects ---------------------------------------------------------------------------
def _records(obj: Any) -> Dict[str, MethodPatch]:
    return getattr(obj, "__dict__", {}).get(RECORDS_ATTR, {})


def _set_record(obj: Any, name: str, patch: Optional[MethodPatch]) -> None:
    records = dict(_records(obj))
    if patch is None:
        records.pop(name, None)
    else:
        records[name] = patch
    if records:
        object.__setattr__(obj, RECORDS_ATTR, records)
    elif RECORDS_ATTR in vars(obj):
        object.__delattr__(obj, RECORDS_ATTR)


def _on(obj: Any) -> List[Tuple[str, MethodPatch]]:
    """(where, patch) for every patch on ``obj`` and its parts, each once, in the order applied on
    each object; ``where`` is the name of the part it was patched on ("" for ``obj`` itself)."""
    seen, found = set(), []
    for where, holder in [("", obj)] + parts(obj):
        for patch in _records(holder).values():
            if id(patch) not in seen:
                seen.add(id(patch))
                found.append(("" if patch.target is obj else where, patch))
    return found


def located(obj: Any) -> List[Tuple[str, str, MethodPatch]]:
    """(key, where, patch) for every patch on ``obj`` and its parts: ``key`` is the method's name
    (suffixed with the part in the rare case two parts carry the same method), ``where`` the part
    it was patched on ("" for ``obj`` itself)."""
    keys: set = set()
    found = []
    for where, patch in _on(obj):
        key = patch.method if patch.method not in keys else f"{patch.method} ({where})"
        keys.add(key)
        found.append((key, where, patch))
    return found


def patches_on(obj: Any) -> Dict[str, MethodPatch]:
    """{method: patch} on ``obj`` and its parts (a pipeline's denoiser patched on its own)."""
    return {key: patch for key, _, patch in located(obj)}


def get_patch(obj: Any, method: str) -> Optional[MethodPatch]:
    """The installed patch of ``method`` on ``obj`` (or on a part of it), or None."""
    return patches_on(obj).get(method)


def require_patch(obj: Any, method: str, caller: str) -> MethodPatch:
    """``get_patch``, or a ``ValueError`` naming ``caller`` (a method's helper, e.g. ``avit.depth_map``)."""
    patch = get_patch(obj, method)
    if patch is None:
        raise ValueError(f"{caller}: {family(obj)} is not patched with {method} "
                         f"({method} is not patched on it or its parts)")
    return patch


def _attached(patch: MethodPatch) -> bool:
    return _records(patch.target).get(patch.method) is patch


def _attach(patch: MethodPatch) -> None:
    patch.install()
    for obj in patch.covers():
        _set_record(obj, patch.method, patch)


def _detach(patch: MethodPatch) -> None:
    patch.uninstall()
    for obj in patch.covers():
        if _records(obj).get(patch.method) is patch:
            _set_record(obj, patch.method, None)


def _decides_tokens(name: str) -> bool:
    method = _METHODS.get(name)
    return method is not None and method.decides_tokens


# -- applying and removing ------------------------------------------------------------------------
def install(obj: Any, new: Dict[str, MethodPatch]) -> List[MethodPatch]:
    """Install the built patches ``new`` ({method: patch}) on ``obj``, atomically.

    A patch of the same method already on ``obj``, on one of its parts, or on an object a new
    patch covers is replaced. If anything fails, ``obj`` is left exactly as it was (replaced
    patches come back). Returns the replaced patches.
    """
    present: List[Tuple[str, MethodPatch]] = []
    for holder in [obj] + [o for patch in new.values() for o in patch.covers()]:
        present += [item for item in _on(holder) if all(item[1] is not p for _, p in present)]
    replaced = [patch for _, patch in present if patch.method in new]
    kept = [(where, patch) for where, patch in present if patch.method not in new and _decides_tokens(patch.method)]
    wanted = {patch.method for _, patch in kept} | {name for name in new if _decides_tokens(name)}
    if len(wanted) > 1:
        on = ", ".join(sorted(p.method + (f" (on {where})" if where else "") for where, p in kept)) or "nothing"
        raise ValueError(
            f"accel.patch: {', '.join(sorted(wanted))} each decide which tokens the blocks of {family(obj)} "
            f"compute and do not compose; patch one of them (already patched: {on})"
        )
    done: List[Tuple[str, MethodPatch]] = []  # ("detached" | "attached", patch), to undo in reverse
    try:
        for name, patch in new.items():
            for old in replaced:
                if old.method == name:
                    _detach(old)
                    done.append(("detached", old))
            _attach(patch)
            done.append(("attached", patch))
    except BaseException:
        for what, patch in reversed(done):
            (_detach if what == "attached" else _attach)(patch)
        raise
    return replaced


def remove(obj: Any, names: Iterable[str] = ()) -> None:
    """Remove the named methods from ``obj`` and its parts (all when none is named)."""
    names = list(names)
    present = patches_on(obj)
    for name in names:
        if name not in present:
            patched = ", ".join(present) or "nothing"
            raise ValueError(f"accel.unpatch: {name} is not patched on {family(obj)} (patched: {patched})")
    for name, patch in reversed(list(present.items())):
        if not names or name in names:
            _detach(patch)


@contextlib.contextmanager
def scoped(obj: Any, new: Dict[str, MethodPatch]) -> Iterator[Any]:
    """``install`` for the duration of a ``with`` block; on exit the patches it replaced come back
    (a patch already removed or replaced inside the block is left as it is)."""
    replaced = install(obj, new)
    try:
        yield obj
    finally:
        for name, patch in new.items():
            if _attached(patch):
                _detach(patch)
                for old in replaced:
                    if old.method == name:
                        _attach(old)
