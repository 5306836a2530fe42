"""Two GPU probes behind readings in docs/benchmarks.md (needs CUDA; the reference DeepCache
package for the first):

    python scripts/gpu_probe.py deepcache   # per-step times of DeepCache N=3/5, ours against the reference
    python scripts/gpu_probe.py compile     # ToMe r=16 on ViT-B/16, batch 64, fp16: eager and torch.compile
    python scripts/gpu_probe.py profile     # where the time goes: ToMe r=16 on ViT-B/16, batch 64, fp16
    python scripts/gpu_probe.py adaptive    # A-ViT removal and early exit on ViT-B/16, batch 256, fp16

deepcache: SD-1.5-configuration UNet (seeded random weights), fp16, 10-step DDIM at 512 px, batch
1; the scheduler's ``step`` is wrapped to synchronise and take a timestamp, so each step's time is
its own. 20 interleaved rounds (order rotated), medians per step.
compile: unpatched and ToMe-patched models, eager and compiled (``mode="default"`` and
``"reduce-overhead"``, i.e. CUDA graphs), interleaved, images/s. Prints JSON lines.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import accel  # noqa: E402
from accel.eval.timing import time_interleaved  # noqa: E402


def deepcache_steps(rounds: int = 20) -> dict:
    from DeepCache import DeepCacheSDHelper
    from bench_diffusion import SD15_UNET, build_pipeline

    pipe = build_pipeline(SD15_UNET, 0).to("cuda", torch.float16)
    embeds = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
    stamps = []
    step = pipe.scheduler.step

    def timed_step(*args, **kwargs):
        out = step(*args, **kwargs)
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return out

    pipe.scheduler.step = timed_step

    def loop():
        stamps.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompt_embeds=embeds, num_inference_steps=10, guidance_scale=1.0, height=512, width=512,
             output_type="latent", generator=torch.Generator().manual_seed(1))
        return [b - a for a, b in zip([start] + stamps[:-1], stamps)]

    def ours(n):
        def run():
            accel.patch(pipe, deepcache=n)
            try:
                return loop()
            finally:
                accel.unpatch(pipe)
        return run

    def reference(n):
        def run():
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=n, cache_branch_id=0)
            helper.enable()
            try:
                return loop()
            finally:
                helper.disable()
        return run

    variants = {"unpatched": loop, "accel N=5": ours(5), "DeepCache N=5": reference(5),
                "accel N=3": ours(3), "DeepCache N=3": reference(3)}
    names, runs = list(variants), {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(variants[name]())
    out = {}
    for name, steps in runs.items():
        per_step = [statistics.median(s[i] for s in steps) for i in range(len(steps[0]))]
        out[name] = {"total_ms": round(1000 * sum(per_step), 1), "per_step_ms": [round(1000 * t, 2) for t in per_step]}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def tome_compiled(name: str = "vit_base_patch16_224", batch: int = 64, r: int = 16) -> dict:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(name).eval().to("cuda", torch.float16)
    tome = accel.patch(copy.deepcopy(base), tome=r)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    calls = {"eager": base, f"eager tome r={r}": tome}
    with torch.inference_mode():
        for mode in ("default", "reduce-overhead"):
            for label, model in (("compiled", base), (f"compiled tome r={r}", tome)):
                compiled = torch.compile(model, mode=mode)
                for _ in range(3):
                    compiled(x)
                calls[f"{label} {mode}"] = compiled
        timings = time_interleaved({k: (lambda m=m: m(x)) for k, m in calls.items()}, repeats=15,
                                   items_per_call=batch, sync=torch.cuda.synchronize)
    out = {k: round(t.items_per_s, 1) for k, t in timings.items()}
    print(json.dumps({f"{name} batch {batch}": out}), flush=True)
    return out


def tome_profile(name: str = "vit_base_patch16_224", batch: int = 64, r: int = 16, rows: int = 18) -> dict:
    """Unpatched and ToMe-patched (kernels on Triton, then on the torch reference) timed
    interleaved, then one forward of each under ``torch.profiler``: the CUDA kernels that take the
    time, so that a missed target comes with where its time goes."""
    import os

    import timm
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    base = timm.create_model(name).eval().to("cuda", torch.float16)
    tome = accel.patch(copy.deepcopy(base), tome=r)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)

    def with_kernels(backend):
        def run():
            old = os.environ.get("ACCEL_KERNELS")
            os.environ["ACCEL_KERNELS"] = backend
            try:
                return tome(x)
            finally:
                os.environ.pop("ACCEL_KERNELS") if old is None else os.environ.__setitem__("ACCEL_KERNELS", old)
        return run

    calls = {"unpatched": lambda: base(x), f"tome r={r} triton": with_kernels("triton"),
             f"tome r={r} torch": with_kernels("torch")}
    out = {}
    with torch.inference_mode():
        timings = time_interleaved(calls, repeats=15, warmup=2, items_per_call=batch, sync=torch.cuda.synchronize)
        out["img/s"] = {k: round(t.items_per_s, 1) for k, t in timings.items()}
        print(json.dumps({f"{name} batch {batch} fp16": out["img/s"]}), flush=True)
        for label, fn in calls.items():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            averages = prof.key_averages()
            try:
                table = averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)
            except (AttributeError, KeyError, ValueError):  # older torch
                table = averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)
            out[label] = table
            print(f"--- {label}\n{table}", flush=True)
    return out


def _bisect(measure, low: float, high: float, target: float, steps: int = 14) -> float:
    """The setting in [low, high] whose measured mean depth is closest to ``target``, for a depth
    that grows with the setting."""
    for _ in range(steps):
        middle = (low + high) / 2
        if measure(middle) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def adaptive(name: str = "vit_base_patch16_224", batch: int = 256, depth: float = 6.0, small: bool = False) -> dict:
    """A-ViT's token removal and early exit per image on a ViT-B-sized model (seeded random weights),
    each set to a mean depth of ``depth`` blocks of 12 on a calibration batch: A-ViT by its halting
    offset ``beta`` (gamma 10, eps 0.01), early exit by one max-probability threshold for random
    exit heads after blocks 3, 5, 7 and 9. Timed interleaved with the unpatched model on another
    batch; images/s and the mean depths reached. ``small``: a 4-block toy on the CPU (a smoke run)."""
    import timm

    from accel.patches.early_exit.heads import ExitHeads

    cuda = torch.cuda.is_available() and not small
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2) if small else {}
    base = timm.create_model(name, **kwargs).eval().to(device, dtype)
    blocks = len(base.blocks)
    depth = depth if not small else 2.0
    exits = [3, 5, 7, 9] if not small else [0, 1, 2]
    size = base.patch_embed.img_size
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(32 if not small else 8, 3, *size, generator=g).to(device, dtype)
    x = torch.randn(batch if not small else 8, 3, *size, generator=g).to(device, dtype)

    def mean_depth(model, method):
        with torch.inference_mode():
            model(calibration)
        return accel.describe(model)["methods"][method]["last_call"]["mean_depth"]

    def avit_at(beta):
        return accel.patch(copy.deepcopy(base), avit=accel.AViT(gamma=10.0, beta=beta))

    beta = _bisect(lambda b: mean_depth(avit_at(b), "avit"), -50.0, 100.0, depth)
    torch.manual_seed(2)
    heads = ExitHeads(exits, base.embed_dim, base.num_classes).eval().to(device, dtype)

    def exit_at(threshold):
        return accel.patch(copy.deepcopy(base), early_exit=dict(heads=heads, thresholds=threshold))

    threshold = _bisect(lambda t: mean_depth(exit_at(t), "early_exit"), 0.0, 1.0, depth)
    variants = {"unpatched": base, f"avit beta={beta:.2f}": avit_at(beta),
                f"early_exit max_prob>={threshold:.5f}": exit_at(threshold)}
    with torch.inference_mode():
        timings = time_interleaved({k: (lambda m=m: m(x)) for k, m in variants.items()}, repeats=7, warmup=2,
                                   items_per_call=x.shape[0], sync=torch.cuda.synchronize if cuda else None)
        depths = {}
        for label, model in list(variants.items())[1:]:
            model(x)
            method = "avit" if label.startswith("avit") else "early_exit"
            depths[label] = round(accel.describe(model)["methods"][method]["last_call"]["mean_depth"], 2)
    base_s = timings["unpatched"].median_s
    out = {label: {"img/s": round(t.items_per_s, 1), "speedup": round(base_s / t.median_s, 2),
                   "mean depth": depths.get(label, float(blocks))} for label, t in timings.items()}
    print(json.dumps({f"{name} batch {x.shape[0]} {str(dtype)[6:]}": out}), flush=True)
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "adaptive" and "--small" in sys.argv:  # a smoke run on the CPU
        adaptive(small=True)
        raise SystemExit(0)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe.py needs a CUDA device")
    probes = {"deepcache": deepcache_steps, "compile": tome_compiled, "profile": tome_profile, "adaptive": adaptive}
    if what not in probes:
        raise SystemExit(f"usage: python scripts/gpu_probe.py {'|'.join(probes)}")
    probes[what]()
