"""The one reversible mechanism every patch uses.

A hook replaces a method of one module *instance* (usually ``forward``) without touching its
class, its parameters or its state_dict. Hooks on the same method form a chain: the hook added
last runs first and receives ``call_next``, the rest of the chain ending in the original method.
Removing hooks in any order rebuilds the chain; removing the last one deletes every attribute
the mechanism added, so an unpatched module is exactly the module it was.

    handle = add_hook(block, my_hook)            # my_hook(module, call_next, *args, **kwargs)
    handle.remove()

If something else (accelerate's offload hooks, say) wrapped the same method *after* us, the
trampoline it captured stays in place as a pass-through instead of being torn out from under it.

``method="__call__"`` hooks calling the object itself (``pipe(...)``). Python looks ``__call__``
up on the type, so the instance's class is swapped for a one-level subclass (same name and
module) whose ``__call__`` runs the chain; the last removal swaps the original class back (or,
if something swapped the class again on top of ours, leaves ours as a pass-through).

Everything the mechanism adds is plain data reachable from the module (the installed method is
a ``_Trampoline`` object, not a closure), so ``copy.deepcopy`` of a hooked module gives a copy
whose hooks run on the copy, and pickling (``torch.save(model)``) stores the hooks with it: the
bound methods are rebuilt from the class on load, and the swapped class is recreated.
"""
from __future__ import annotations

import copyreg
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["Hook", "HookHandle", "HookGroup", "add_hook", "hooked_methods"]

# Attribute that holds the chains of one module: {method name: _Chain}.
_CHAINS_ATTR = "_accel_hooks"
# Class attribute of a ``__call__`` swap subclass: the class it replaced.
_SWAPPED_FROM = "_accel_swapped_from"

Hook = Callable[..., Any]  # hook(module, call_next, *args, **kwargs) -> output


class _Trampoline:
    """What stands in the module's ``__dict__`` in place of the hooked method: calls the chain's
    current composition. An object, not a closure, so a deep copy or a pickle of the module carries
    its own chain instead of calling back into the original's."""

    def __init__(self, chain: "_Chain") -> None:
        self.chain = chain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.chain.composed(*args, **kwargs)

    @property
    def __wrapped__(self) -> Callable[..., Any]:  # inspect.signature(module.forward) stays the original's
        return self.chain.base

    def __repr__(self) -> str:
        return f"<accel hook chain on {type(self.chain.module).__name__}.{self.chain.name}>"


class _Chain:
    """The hooks on one method of one module, and how to undo them."""

    def __init__(self, module: Any, name: str) -> None:
        self.module = module
        self.name = name
        self.had_instance_attr = name in vars(module)
        self.previous = vars(module).get(name)
        self.swapped: Optional[Tuple[type, type]] = None  # (original class, our subclass) for __call__
        if name == "__call__":
            self._swap_class()
        self.base = self._base()
        # (token, hook) in the order added; a handle names its hook by the token, so nothing but
        # the chain refers to a hook (a copy or pickle would otherwise duplicate a hook reached
        # through its own constructor arguments, e.g. a partial of a bound method of a patch)
        self.entries: List[Tuple[object, Hook]] = []
        self.composed: Callable[..., Any] = self.base
        self.trampoline = _Trampoline(self)
        object.__setattr__(module, name, self.trampoline)

    def _base(self) -> Callable[..., Any]:
        """The method the chain ends in: an earlier instance attribute, or the class's method bound
        to the module (looked up on the class, so it can be rebuilt after a copy or a load)."""
        if self.had_instance_attr:
            return self.previous
        cls = _unswapped(type(self.module))
        if self.name == "__call__":
            return functools.partial(cls.__call__, self.module)
        for klass in cls.__mro__:
            if self.name in vars(klass):
                return vars(klass)[self.name].__get__(self.module, cls)
        return getattr(self.module, self.name)

    def _swap_class(self) -> None:
        base = type(self.module)
        original = _unswapped(base).__call__

        def __call__(obj: Any, *args: Any, **kwargs: Any) -> Any:
            own = vars(obj).get("__call__")  # our trampoline while hooks are on
            return original(obj, *args, **kwargs) if own is None else own(*args, **kwargs)

        functools.update_wrapper(__call__, original)
        sub = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__, "__doc__": base.__doc__,
                                            "__reduce_ex__": _reduce_unswapped, _SWAPPED_FROM: base})
        object.__setattr__(self.module, "__class__", sub)
        self.swapped = (base, sub)

    # -- copies and pickles: bound methods and the swapped class are rebuilt, not stored ----------
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        del state["base"], state["composed"]
        state["swapped"] = self.swapped is not None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        swapped = state.pop("swapped")
        self.__dict__.update(state, swapped=None)
        if swapped:  # the copy was made (or loaded) with the original class: swap again
            self._swap_class()
        self.base = self._base()
        self.rebuild()

    @property
    def hooks(self) -> List[Hook]:
        return [hook for _, hook in self.entries]

    def rebuild(self) -> None:
        fn = self.base
        for hook in self.hooks:  # the hook added last ends up outermost
            fn = functools.partial(hook, self.module, fn)
        self.composed = fn

    def detach(self) -> bool:
        """Restore the method if nothing wrapped it after us; True when fully restored."""
        if vars(self.module).get(self.name) is not self.trampoline:
            return False  # someone wrapped on top of us: stay as a pass-through
        if self.had_instance_attr:
            object.__setattr__(self.module, self.name, self.previous)
        else:
            object.__delattr__(self.module, self.name)
        if self.swapped is not None and type(self.module) is self.swapped[1]:
            object.__setattr__(self.module, "__class__", self.swapped[0])
        return True


def _reduce_unswapped(obj: Any, protocol: int) -> Any:
    """``__reduce_ex__`` of a swapped object: reduced as its original class (a class made at run
    time cannot be pickled by name); its hook chain swaps the class again when restored."""
    cls = _unswapped(type(obj))
    reduced = cls.__reduce_ex__(obj, protocol)
    if not isinstance(reduced, tuple) or len(reduced) < 2:
        return reduced
    func, args = reduced[0], tuple(cls if arg is type(obj) else arg for arg in reduced[1])
    # pickle checks that __newobj__'s class is the object's own; rebuild through our twin instead
    func = {copyreg.__newobj__: _new_object, copyreg.__newobj_ex__: _new_object_ex}.get(func, func)
    return (func, args) + tuple(reduced[2:])


def _new_object(cls: type, *args: Any) -> Any:
    return cls.__new__(cls, *args)


def _new_object_ex(cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return cls.__new__(cls, *args, **kwargs)


def _unswapped(cls: type) -> type:
    """The class below our ``__call__`` swaps (a swap's ``__call__`` would call back into ours)."""
    while _SWAPPED_FROM in vars(cls):
        cls = vars(cls)[_SWAPPED_FROM]
    return cls


class _Token:
    """Identifies one hook in its chain."""


class HookHandle:
    """Removes one hook; removing twice is harmless."""

    def __init__(self, chain: _Chain, token: object) -> None:
        self._chain: Optional[_Chain] = chain
        self._token = token

    def remove(self) -> None:
        chain, self._chain = self._chain, None
        if chain is None:
            return
        chain.entries = [(token, hook) for token, hook in chain.entries if token is not self._token]
        chain.rebuild()
        if chain.entries:
            return
        chains = vars(chain.module).get(_CHAINS_ATTR, {})
        if chain.detach():
            chains.pop(chain.name, None)
        if not chains and _CHAINS_ATTR in vars(chain.module):
            object.__delattr__(chain.module, _CHAINS_ATTR)


def add_hook(module: Any, hook: Hook, method: str = "forward") -> HookHandle:
    """Wrap ``module.<method>`` with ``hook(module, call_next, *args, **kwargs)``."""
    if not callable(getattr(module, method, None)):
        raise TypeError(f"{type(module).__name__} has no method {method!r} to hook")
    chains = vars(module).get(_CHAINS_ATTR)
    if chains is None:
        chains = {}
        object.__setattr__(module, _CHAINS_ATTR, chains)
    chain = chains.get(method)
    if chain is None:
        chain = chains[method] = _Chain(module, method)
    token = _Token()
    chain.entries.append((token, hook))
    chain.rebuild()
    return HookHandle(chain, token)


def hooked_methods(module: Any) -> List[str]:
    """Names of the methods of ``module`` that currently carry hooks."""
    return [name for name, chain in vars(module).get(_CHAINS_ATTR, {}).items() if chain.hooks]


class HookGroup:
    """Hooks installed together and removed together (in reverse order)."""

    def __init__(self) -> None:
        self.handles: List[HookHandle] = []

    def add(self, module: Any, hook: Hook, method: str = "forward") -> HookHandle:
        handle = add_hook(module, hook, method)
        self.handles.append(handle)
        return handle

    def remove_all(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __len__(self) -> int:
        return len(self.handles)
