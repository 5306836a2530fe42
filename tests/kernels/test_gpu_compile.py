"""Every Triton kernel compiled for an H100 (sm_90) on this CPU machine, with the arguments its
launcher really passes: the interpreter that runs the kernels in CI accepts code that the GPU
compiler refuses (a plain Python global read inside a kernel, for one), so each launch is captured
and compiled through Triton's whole pipeline to a cubin, without a GPU. Float arguments are refused:
Triton's own launcher passes them as fp32 but torch.compile's as fp64, which broke a kernel's
loop-carried types on the H100 (they are constexprs instead)."""
from __future__ import annotations

import pytest
import torch

import accel.kernels as kernels
from accel.kernels.registration import KernelOp

pytestmark = pytest.mark.usefixtures("one_thread")

POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
           torch.int32: "*i32", torch.bool: "*i1", torch.uint8: "*u8"}
OPTIONS = ("num_warps", "num_stages")


class Capture:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.op, args, kwargs))


COMPILER = """
import json, sys
import triton
from importlib import import_module
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

results = []
for job in json.load(sys.stdin):
    fn = triton.jit(getattr(import_module(job["module"]), job["function"]))
    constants = {(index,): value for index, value in job["constants"]}
    try:
        compiled = triton.compile(ASTSource(fn, job["signature"], constants), target=GPUTarget("cuda", 90, 32),
                                  options=job["options"])
        results.append("ok" if compiled.asm["cubin"] else "no cubin")
    except Exception as error:
        results.append(f"{type(error).__name__}: {error}")
print(json.dumps(results))
"""


def job(op, args, kwargs):
    """What the compiler needs of one launch: the kernel, its argument types and constexprs."""
    fn = op.kernel()
    names = list(fn.__code__.co_varnames[:fn.__code__.co_argcount])
    signature, constants = {}, []
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:  # Triton's launcher passes a float as fp32, torch.compile's as fp64: no kernel takes one
            raise AssertionError(f"{op.name}: the float argument {name} must be a tl.constexpr")
    for name, value in kwargs.items():
        if name not in OPTIONS:
            signature[name] = "constexpr"
            constants.append((names.index(name), value))
    assert set(signature) == set(names), f"{op.name}: arguments not passed: {set(names) - set(signature)}"
    return {"module": fn.__module__, "function": fn.__name__, "signature": signature, "constants": constants,
            "options": {k: v for k, v in kwargs.items() if k in OPTIONS}}


def compile_for_hopper(jobs):
    """Triton's compiler in a process of its own: this one imported triton.language for the
    interpreter, which the compiler refuses."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILER], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def capture_launches(monkeypatch, call):
    captures = {}

    def jit(self):
        return captures.setdefault(self.name, Capture(self))

    monkeypatch.setattr(KernelOp, "jit", jit)
    call()
    return [c for capture in captures.values() for c in capture.calls]


def tensors(*shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]


def tome_indices(n, r, protected):
    from accel.patches.tome.merge import bipartite_soft_matching

    match = bipartite_soft_matching(torch.randn(2, n, 8, generator=torch.Generator().manual_seed(1)), r, protected)
    return protected, match.unm_idx, match.src_idx, match.dst_idx


# launches that reach every kernel, in the variants that compile differently (dtypes, constexpr branches)
CALLS = [
    lambda dtype: kernels.best_match(*tensors((2, 9, 64), (2, 8, 64), dtype=dtype), backend="triton"),
    lambda dtype: kernels.best_match(*tensors((2, 9, 320), (2, 8, 320), dtype=dtype), backend="triton"),
    lambda dtype: kernels.weighted_merge(*tensors((2, 17, 24), dtype=dtype), torch.ones(2, 17, 1, dtype=dtype),
                                         *tome_indices(17, 4, 1), backend="triton"),
    lambda dtype: kernels.bipartite_merge(*tensors((2, 17, 24), dtype=dtype), None, *tensors((2, 17, 8), dtype=dtype),
                                          4, 1, backend="triton"),
    lambda dtype: kernels.biased_attention(*tensors((2, 3, 33, 64), (2, 3, 33, 64), (2, 3, 33, 64), dtype=dtype),
                                           torch.zeros(2, 33), backend="triton"),
    lambda dtype: [op(*tensors((2, 17, 24), dtype=dtype), *tome_indices(17, 4, 1), backend="triton")
                   for op in (kernels.mean_merge, kernels.amax_merge)],
    lambda dtype: kernels.unmerge(*tensors((2, 13, 24), dtype=dtype), *tome_indices(17, 4, 1), backend="triton"),
    lambda dtype: merge_and_unmerge_2d(dtype),
    lambda dtype: [kernels.gather_tokens(*tensors((2, 17, 24), dtype=dtype), torch.tensor([[0, 3], [5, 1]]), 1,
                                         backend="triton"),
                   kernels.scatter_tokens(*tensors((2, 17, 24), dtype=dtype), torch.tensor([[0, 3], [5, 1]]),
                                          *tensors((2, 2, 24), dtype=dtype), backend="triton"),
                   kernels.compact_tokens(*tensors((2, 17, 24), dtype=dtype), torch.rand(2, 17) < 0.5,
                                          backend="triton")],
    lambda dtype: paged_attention_step(dtype),
    lambda dtype: grouped_matmul_both(dtype),
]
KERNELS = ["best_match", "weighted_merge", "merge_targets", "merge_rows", "biased_attention", "mean_merge",
           "amax_merge", "unmerge", "mean_merge2d", "unmerge2d", "gather_tokens", "scatter_tokens", "compact_tokens",
           "packed_paged_attention", "grouped_matmul"]


def grouped_matmul_both(dtype):
    """MoE's two products: token rows gathered (no weights), then pair rows weighted (a constexpr
    branch); 3 tokens, top-2 of 4 experts."""
    from accel.kernels.grouped_matmul import align_pairs, grouped_matmul

    pairs, block_experts = align_pairs(torch.tensor([[0, 2], [1, 2], [3, 0]]), 4, 16)
    x, gate_up, down = tensors((3, 64), (4, 96, 64), (4, 64, 48), dtype=dtype)
    grouped_matmul(x, gate_up, pairs, block_experts, 16, 6, 2, backend="triton")
    grouped_matmul(*tensors((6, 48), dtype=dtype), down, pairs, block_experts, 16, 6, 1, torch.ones(6, dtype=dtype),
                   backend="triton")


def merge_and_unmerge_2d(dtype):
    """ToMe-SD's merge and unmerge on a 4 x 4 grid, 2 x 2 windows, half the tokens merged."""
    from accel.patches.tome.merge2d import bipartite_soft_matching_random2d

    match = bipartite_soft_matching_random2d(torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2)),
                                             4, 4, 2, 2, 8, generator=torch.Generator().manual_seed(0))
    grid = (match.a_idx, match.b_idx, match.unm_idx, match.src_idx, match.dst_idx)
    kernels.mean_merge2d(*tensors((2, 16, 24), dtype=dtype), *grid, backend="triton")
    kernels.unmerge2d(*tensors((2, 16 - match.r, 24), dtype=dtype), *grid, backend="triton")


def paged_attention_step(dtype):
    """A decode token and a prefill chunk of 3 over shuffled blocks of 4; GQA 4 / 2 heads of 64
    channels, without and with a sliding window (a constexpr branch)."""
    query, key_cache, value_cache = tensors((4, 4, 64), (6, 4, 2, 64), (6, 4, 2, 64), dtype=dtype)
    step = (torch.tensor([[3, 1, 4], [0, 5, 0]]), torch.tensor([9, 5]), torch.tensor([0, 1, 4]))
    for window in (None, 3):
        kernels.packed_paged_attention(query, key_cache, value_cache, *step, scale=0.125, sliding_window=window,
                                       backend="triton")


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def compiled():
    """(op name, dtype name) -> the compiler's answer for each of its launches, all compiled in one
    process."""
    import _pytest.monkeypatch

    keys, jobs = [], []
    with _pytest.monkeypatch.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for call in CALLS:
            for label, dtype in DTYPES.items():
                for op, args, kwargs in capture_launches(monkeypatch, lambda: call(dtype)):
                    keys.append((op.name, label))
                    jobs.append(job(op, args, kwargs))
    results = {}
    for key, answer in zip(keys, compile_for_hopper(jobs)):
        results.setdefault(key, []).append(answer)
    return results


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", KERNELS)
def test_the_kernel_compiles_for_an_h100(compiled, name, dtype):
    answers = compiled.get((name, dtype))
    assert answers, f"{name} launched nothing"
    assert answers == ["ok"] * len(answers), answers


def test_every_kernel_is_compiled_here():
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(kernels.__path__):  # every op is defined
        importlib.import_module(f"accel.kernels.{module.name}")
    assert {op.name for op in KernelOp.ALL} <= set(KERNELS), "add the new kernel's launches to CALLS and KERNELS"
