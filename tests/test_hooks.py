import inspect

import pytest
import torch
from torch import nn

from accel.hooks import HookGroup, add_hook, hooked_methods


def scale_hook(factor):
    def hook(module, call_next, x):
        return call_next(x) * factor

    return hook


def test_hook_wraps_forward_and_removal_restores_everything():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    ref = lin(x)
    before = set(vars(lin))
    handle = add_hook(lin, scale_hook(2.0))
    assert torch.equal(lin(x), ref * 2)
    assert hooked_methods(lin) == ["forward"]
    handle.remove()
    handle.remove()  # harmless twice
    assert torch.equal(lin(x), ref)
    assert set(vars(lin)) == before
    assert "forward" not in vars(lin)


def test_chain_order_and_removal_in_any_order():
    calls = []

    def tag(name):
        def hook(module, call_next, x):
            calls.append(name)
            return call_next(x) + 1

        return hook

    lin = nn.Identity()
    h1, h2, h3 = (add_hook(lin, tag(n)) for n in "abc")
    x = torch.zeros(1)
    assert lin(x).item() == 3
    assert calls == ["c", "b", "a"]  # the hook added last runs first
    h2.remove()
    calls.clear()
    assert lin(x).item() == 2 and calls == ["c", "a"]
    h1.remove()
    h3.remove()
    assert lin(x).item() == 0
    assert "_accel_hooks" not in vars(lin)


def test_signature_of_hooked_method_is_the_original():
    lin = nn.Linear(3, 3)
    original = inspect.signature(lin.forward)
    add_hook(lin, scale_hook(1.0))
    assert inspect.signature(lin.forward) == original


def test_hooks_on_other_methods_and_existing_instance_attribute():
    class Thing(nn.Module):
        def pool(self, x, pool_type=None):
            return x.sum()

    thing = Thing()
    custom = lambda x, pool_type=None: x.mean()  # noqa: E731 -- an instance override set by someone else
    thing.pool = custom
    handle = add_hook(thing, lambda m, call_next, x, pool_type=None: call_next(x, pool_type=pool_type) * 10, "pool")
    assert thing.pool(torch.ones(4)).item() == 10.0
    handle.remove()
    assert vars(thing)["pool"] is custom


def test_foreign_wrapper_on_top_survives_our_removal():
    lin = nn.Linear(3, 3)
    x = torch.randn(1, 3)
    ref = lin(x)
    handle = add_hook(lin, scale_hook(3.0))
    ours = lin.forward
    lin.forward = lambda *a, **k: ours(*a, **k) + 1  # e.g. an offload hook added after us
    handle.remove()
    assert torch.allclose(lin(x), ref + 1)  # ours became a pass-through under theirs


def test_hook_group_removes_all_and_rejects_missing_method():
    a, b = nn.Identity(), nn.Identity()
    group = HookGroup()
    group.add(a, scale_hook(2.0))
    group.add(b, scale_hook(2.0))
    assert len(group) == 2
    group.remove_all()
    assert len(group) == 0 and hooked_methods(a) == [] and "forward" not in vars(b)
    with pytest.raises(TypeError, match="no method 'nope'"):
        add_hook(a, scale_hook(1.0), "nope")


def test_call_hooks_swap_the_class_per_instance_and_restore_it():
    import inspect

    class Pipe:
        def __call__(self, x, scale=1):
            return x * scale

    pipe, other = Pipe(), Pipe()
    seen = []
    first = add_hook(pipe, lambda obj, call_next, *a, **k: (seen.append(a), call_next(*a, **k))[1], "__call__")
    second = add_hook(pipe, lambda obj, call_next, *a, **k: call_next(*a, **k) + 100, "__call__")
    assert pipe(2, scale=3) == 106 and seen == [(2,)]
    assert isinstance(pipe, Pipe) and type(pipe).__name__ == "Pipe" and type(pipe) is not Pipe
    assert type(other) is Pipe and other(2) == 2  # other instances untouched
    assert str(inspect.signature(pipe)) == "(x, scale=1)"
    first.remove()
    assert pipe(2) == 102 and type(pipe) is not Pipe
    second.remove()
    assert type(pipe) is Pipe and vars(pipe) == {} and pipe(2) == 2


def test_call_hook_under_a_later_class_swap_stays_a_pass_through():
    class Pipe:
        def __call__(self, x):
            return x

    pipe = Pipe()
    handle = add_hook(pipe, lambda obj, call_next, x: call_next(x) + 1, "__call__")
    ours = type(pipe)

    class Theirs(ours):  # something else swaps the class after us (e.g. another library)
        def __call__(self, x):
            return super().__call__(x) * 10

    pipe.__class__ = Theirs
    assert pipe(1) == 20
    handle.remove()
    assert type(pipe) is Theirs and pipe(1) == 10  # theirs kept; ours passes through
