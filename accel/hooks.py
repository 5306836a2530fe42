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
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["Hook", "HookHandle", "HookGroup", "add_hook", "hooked_methods"]

# Attribute that holds the chains of one module: {method name: _Chain}.
_CHAINS_ATTR = "_accel_hooks"
# Class attribute of a ``__call__`` swap subclass: the class it replaced.
_SWAPPED_FROM = "_accel_swapped_from"

Hook = Callable[..., Any]  # hook(module, call_next, *args, **kwargs) -> output


class _Chain:
    """The hooks on one method of one module, and how to undo them."""

    def __init__(self, module: Any, name: str) -> None:
        self.module = module
        self.name = name
        self.had_instance_attr = name in vars(module)
        self.previous = vars(module).get(name)
        self.swapped: Optional[Tuple[type, type]] = None  # (original class, our subclass) for __call__
        if name == "__call__":
            self.base = functools.partial(_unswapped(type(module)).__call__, module)
            self._swap_class()
        else:
            self.base = getattr(module, name)  # bound method, or an earlier instance wrapper
        self.hooks: List[Hook] = []
        self.composed: Callable[..., Any] = self.base
        self.trampoline = self._make_trampoline()
        object.__setattr__(module, name, self.trampoline)

    def _swap_class(self) -> None:
        base = type(self.module)
        original = _unswapped(base).__call__

        def __call__(obj: Any, *args: Any, **kwargs: Any) -> Any:
            own = vars(obj).get("__call__")  # our trampoline while hooks are on
            return original(obj, *args, **kwargs) if own is None else own(*args, **kwargs)

        functools.update_wrapper(__call__, original)
        sub = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__, "__doc__": base.__doc__,
                                            _SWAPPED_FROM: base})
        object.__setattr__(self.module, "__class__", sub)
        self.swapped = (base, sub)

    def _make_trampoline(self) -> Callable[..., Any]:
        chain = self

        def trampoline(*args: Any, **kwargs: Any) -> Any:
            return chain.composed(*args, **kwargs)

        # inspect.signature(module.forward) keeps reporting the original signature.
        return functools.update_wrapper(trampoline, self.base)

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


def _unswapped(cls: type) -> type:
    """The class below our ``__call__`` swaps (a swap's ``__call__`` would call back into ours)."""
    while _SWAPPED_FROM in vars(cls):
        cls = vars(cls)[_SWAPPED_FROM]
    return cls


class HookHandle:
    """Removes one hook; removing twice is harmless."""

    def __init__(self, chain: _Chain, hook: Hook) -> None:
        self._chain: Optional[_Chain] = chain
        self._hook = hook

    def remove(self) -> None:
        chain, self._chain = self._chain, None
        if chain is None:
            return
        chain.hooks.remove(self._hook)
        chain.rebuild()
        if chain.hooks:
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
    chain.hooks.append(hook)
    chain.rebuild()
    return HookHandle(chain, hook)


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
