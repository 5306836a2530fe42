"""Mixture-of-Experts dispatch: accel's experts backend against transformers' own (``eager``,
``batched_mm``, ``grouped_mm``) on one experts module, interleaved, medians.

Shapes (scaled to fit a 2-core CPU; float32 unless ``--dtype``):
- mixtral-like: 8 experts, top-2, hidden 1024, expert width 3584 (Mixtral-8x7B: 4096 and 14336);
- deepseek-like: 64 experts, top-6, hidden 1024, expert width 512 (DeepSeek-V3: 256 experts,
  top-8, 7168 and 2048).
Sizes: decode (8 tokens) and prefill (4,096 tokens). The routing is drawn once per size from a
random router (softmax top-k, renormalised), the same for every backend; every backend's output
is compared with eager's.

``batched_mm`` gathers one copy of the chosen experts' weights per (token, expert) pair: at prefill
that is hundreds of gigabytes, so it is left out there (the table says so).

    python scripts/bench_moe.py                     # both shapes, decode and prefill
    python scripts/bench_moe.py --device cuda --dtype bfloat16   # on a GPU: accel runs its Triton kernel
    python scripts/bench_moe.py --quick             # small shapes, 1 round: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import format_table, machine_description  # noqa: E402
from accel.eval.timing import time_interleaved  # noqa: E402
from accel.llm import moe  # noqa: E402

SHAPES = {"mixtral-like": dict(experts=8, top_k=2, hidden=1024, inner=3584),
          "deepseek-like": dict(experts=64, top_k=6, hidden=1024, inner=512)}
QUICK = {"mixtral-like": dict(experts=4, top_k=2, hidden=64, inner=96),
         "deepseek-like": dict(experts=16, top_k=4, hidden=64, inner=32)}
BACKENDS = ("eager", "batched_mm", "grouped_mm", moe.BACKEND)


def experts_module(shape: Dict[str, int]) -> Any:
    """transformers' Mixtral experts module (the decorated class every backend dispatches from)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["inner"],
                           num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    module = MixtralExperts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (module.gate_up_proj, module.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator) * shape["hidden"] ** -0.5)
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 4096], help="token counts (decode, prefill)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 round: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else SHAPES
    if args.quick:
        args.tokens, args.repeats = [8, 64], 1
    moe.register()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    record: Dict[str, Any] = {"machine": machine_description("transformers", device=device), "dtype": args.dtype,
                              "command": " ".join(["python scripts/bench_moe.py"] + sys.argv[1:]),
                              "load average": os.getloadavg()[0], "rows": []}
    print(f"{record['machine']}; load average {record['load average']:.2f}", flush=True)
    try:
        for name, shape in shapes.items():
            module = experts_module(shape).to(device=device, dtype=dtype)
            for tokens in args.tokens:
                generator = torch.Generator().manual_seed(tokens)
                hidden = torch.randn(tokens, shape["hidden"], generator=generator).to(device=device, dtype=dtype)
                logits = torch.randn(tokens, shape["experts"], generator=generator)
                weights, chosen = (t.to(device) for t in moe.softmax_top_k(logits, shape["top_k"]))
                size = hidden.element_size()
                gathered_gb = tokens * shape["top_k"] * 3 * shape["hidden"] * shape["inner"] * size / 1e9
                backends: List[str] = [b for b in BACKENDS if not (b == "batched_mm" and gathered_gb > 8)]
                notes = {b: f"left out: would gather {gathered_gb:.0f} GB of expert weights"
                         for b in BACKENDS if b not in backends}
                outputs: Dict[str, torch.Tensor] = {}

                def run(backend: str) -> None:
                    module.config._experts_implementation = backend
                    outputs[backend] = module(hidden, chosen, weights)
                with torch.inference_mode():
                    for backend in list(backends):  # a backend this device or dtype refuses is recorded, not fatal
                        try:
                            run(backend)
                        except Exception as error:  # noqa: BLE001 - reported in the table
                            notes[backend] = f"failed: {type(error).__name__}: {str(error)[:80]}"
                            backends.remove(backend)
                    timings = time_interleaved({b: (lambda b=b: run(b)) for b in backends}, repeats=args.repeats,
                                               sync=sync)
                for backend in BACKENDS:
                    row: Dict[str, Any] = {"shape": name, "tokens": tokens, "backend": backend}
                    if backend in timings:
                        row["ms"] = 1e3 * timings[backend].median_s
                        row["vs eager"] = timings["eager"].median_s / timings[backend].median_s
                        row["max |diff| vs eager"] = float((outputs[backend].float() - outputs["eager"].float()).abs().max())
                    else:
                        row["note"] = notes[backend]
                    record["rows"].append(row)
                best = min((r for r in record["rows"] if r["shape"] == name and r["tokens"] == tokens
                            and "ms" in r and r["backend"] != moe.BACKEND), key=lambda r: r["ms"])
                ours = next(r for r in record["rows"] if r["shape"] == name and r["tokens"] == tokens
                            and r["backend"] == moe.BACKEND)
                ours["vs best transformers"] = best["ms"] / ours["ms"]
                ours["best transformers"] = best["backend"]
                print(f"{name}, {tokens} tokens: accel {ours['ms']:.2f} ms, best transformers "
                      f"({best['backend']}) {best['ms']:.2f} ms", flush=True)
    finally:
        moe.unregister()
    record["load average after"] = os.getloadavg()[0]
    print(format_table(record["rows"], [
        ("shape", "shape", ""), ("tokens", "tokens", ""), ("backend", "backend", ""), ("ms", "ms", ".2f"),
        ("vs eager", "speedup vs eager", ".2f"), ("vs best transformers", "vs transformers' best", ".2f"),
        ("max |diff| vs eager", "max |diff| vs eager", ".1e"), ("note", "note", "")], drop_empty=True), flush=True)
    print(f"load average {record['load average']:.2f} before, {record['load average after']:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
