"""The kernels against their torch references, op by op, at the sizes that matter (issue 14).

Sections, in priority order, each printed and written to ``--out`` (JSON) as it finishes, so a run
cut off by a time limit still returns what it measured:
1. ``best_match`` (ToMe's matching scores) at ViT-B/L tokens (197; batch 1/64/256) and SD-1.5
   latents (4096 and 16384 tokens, batch 2): time, and the peak memory above the inputs (the
   reference writes the Na x Nb score matrix, the kernel never does).
2. ``weighted_merge`` at the same sizes with r = a quarter of the tokens: time and achieved memory
   bandwidth (bytes read and written once over the time).
3. ``unmerge`` and the plain merges (ToMe's mean merge, source tracing's amax, ToMe-SD's grid merge
   and unmerge), with the bandwidth column.
4. gather, scatter-back and compaction of ragged token sets (EViT, A-ViT, token exit, early exit,
   RegionCache) at ViT-B batch 256 and DiT-XL/2 sizes.
5. attention with an additive per-key bias (proportional attention's log size): PyTorch's
   ``scaled_dot_product_attention`` without a mask (the flash path, the floor), with the bias as a
   float mask, and FlexAttention with a ``score_mod`` adding it (GPU only).

On a GPU each op runs with ``backend="torch"`` and ``backend="triton"``, interleaved, medians of
``--repeats`` rounds after a warm-up (CUDA-synchronised). On the CPU only the reference is timed:
Triton's interpreter is for correctness, not speed.

    python scripts/bench_kernels.py --device cuda --dtype float16 --out /tmp/kernels.json
    python scripts/bench_kernels.py --quick            # a smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel.kernels as kernels  # noqa: E402
from accel.eval.report import format_table, machine_description  # noqa: E402
from accel.eval.timing import time_interleaved  # noqa: E402
from accel.patches.tome.merge import bipartite_soft_matching  # noqa: E402

# (label, batch, tokens, channels): ViT-B/16 and ViT-L/16 at 224 px (197 tokens; the metric is the
# keys averaged over heads, 64 channels), SD-1.5's first UNet level at 512 and 1024 px (320 channels).
SIZES = [("ViT-B b1", 1, 197, 64), ("ViT-B b64", 64, 197, 64), ("ViT-L b256", 256, 197, 64),
         ("SD 64x64 b2", 2, 4096, 320), ("SD 128x128 b2", 2, 16384, 320)]
QUICK = [("tiny", 2, 33, 16)]


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _peak(fn: Callable[[], Any], device: torch.device) -> float:
    """MiB allocated by ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def bench_op(name: str, calls: Dict[str, Callable[[], Any]], device: torch.device, repeats: int,
             bytes_moved: float = 0.0) -> List[Dict[str, Any]]:
    timings = time_interleaved(calls, repeats=repeats, warmup=2, sync=_sync(device))
    base = timings["torch"].median_s
    reference = calls["torch"]()
    rows = []
    for backend, timing in timings.items():
        seconds = timing.median_s
        rows.append({"op": name, "backend": backend, "ms": 1000 * seconds, "speedup": base / seconds,
                     "GB/s": bytes_moved / seconds / 1e9 if bytes_moved else None,
                     "peak MiB": _peak(calls[backend], device), **_difference(calls[backend](), reference)})
    return rows


def _difference(out: Any, reference: Any) -> Dict[str, float]:
    """Against the reference's outputs: the largest difference of the float tensors and the share of
    integer entries (indices) that differ."""
    err, mismatched = 0.0, 0.0
    for got, want in zip(out, reference):
        if got.is_floating_point():
            err = max(err, (got.float() - want.float()).abs().max().item())
        else:
            mismatched = max(mismatched, (got != want).float().mean().item())
    return {"max err": err, "index mismatch": mismatched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one tiny size, 2 rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON record, rewritten after every section")
    parser.add_argument("--sections", default="tome,match,merge,unmerge,compaction,attention", help="comma-separated, in the order to run")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        parser.error("--dtype float16/bfloat16 is for GPUs")
    gpu = device.type == "cuda"
    sizes, repeats = (QUICK, 2) if args.quick else (SIZES, args.repeats)
    record: Dict[str, Any] = {"machine": machine_description(*(("triton",) if gpu else ()), device=device), "dtype": args.dtype,
                              "command": " ".join(["python scripts/bench_kernels.py"] + sys.argv[1:]), "rows": []}
    print(f"{record['machine']}; {args.dtype}; {'torch vs triton' if gpu else 'torch reference only (CPU)'}")

    def save(rows: List[Dict[str, Any]], section: str) -> None:
        record["rows"] += rows
        print(f"\n{section}\n" + format_table(rows, [
            ("size", "size", ""), ("op", "op", ""), ("backend", "backend", ""), ("ms", "ms", ".3f"),
            ("speedup", "vs torch", ".2f"), ("GB/s", "GB/s", ".0f"), ("peak MiB", "peak MiB", ".1f"),
            ("max err", "max err", ".2e"), ("index mismatch", "index mismatch", ".4f")],
            style="text"), flush=True)
        if args.out:
            args.out.write_text(json.dumps(record, indent=2) + "\n")

    g = torch.Generator().manual_seed(0)
    backends = ("torch", "triton") if gpu else ("torch",)
    sections = {"tome": lambda: bench_tome(sizes, backends, device, dtype, repeats, g),
                "match": lambda: bench_matching(sizes, backends, device, dtype, repeats, g),
                "merge": lambda: bench_merging(sizes, backends, device, dtype, repeats, g),
                "unmerge": lambda: bench_unmerging(sizes, backends, device, dtype, repeats, g),
                "compaction": lambda: bench_compaction(backends, device, dtype, repeats, g,
                                                       COMPACTION_QUICK if args.quick else COMPACTION),
                "attention": lambda: bench_attention(ATTENTION_QUICK if args.quick else ATTENTION, device, dtype,
                                                     repeats, g)}
    for name in args.sections.split(","):
        if name not in sections:
            parser.error(f"--sections: {name!r} is not one of {', '.join(sections)}")
        if name == "attention" and not gpu:
            continue
        try:
            save(sections[name](), name)
        except Exception as error:  # a section that fails on this machine must not cost the others
            print(f"\n{name}: failed: {type(error).__name__}: {error}", flush=True)
            record.setdefault("failed", {})[name] = f"{type(error).__name__}: {error}"


def bench_tome(sizes, backends, device, dtype, repeats, g) -> List[Dict[str, Any]]:
    """0. ToMe's whole step (match and merge, r = 16 or a quarter of the tokens), as a block calls it"""
    rows = []
    for label, batch, n, c in sizes:
        x = torch.randn(batch, n, 768 if n < 1000 else c, generator=g).to(device, dtype)
        metric = torch.randn(batch, n, c, generator=g).to(device, dtype)
        size = torch.randint(1, 4, (batch, n, 1), generator=g).to(device, dtype)
        r, protected = (16, 1) if n < 1000 else (n // 4, 0)
        calls = {k: (lambda k=k: kernels.bipartite_merge(x, size, metric, r, protected, backend=k)) for k in backends}
        rows += [{"size": label, **row} for row in bench_op("bipartite_merge", calls, device, repeats)]
    return rows


def bench_matching(sizes, backends, device, dtype, repeats, g) -> List[Dict[str, Any]]:
    """1. matching scores"""
    rows = []
    for label, batch, n, c in sizes:
        a = torch.randn(batch, (n + 1) // 2, c, generator=g).to(device, dtype)
        b = torch.randn(batch, n // 2, c, generator=g).to(device, dtype)
        calls = {k: (lambda k=k: kernels.best_match(a, b, backend=k)) for k in backends}
        rows += [{"size": label, **row} for row in bench_op("best_match", calls, device, repeats)]
    return rows


def bench_merging(sizes, backends, device, dtype, repeats, g) -> List[Dict[str, Any]]:
    """2. size-weighted merge, r = a quarter of the tokens"""
    rows = []
    for label, batch, n, c in sizes:
        x = torch.randn(batch, n, c, generator=g).to(device, dtype)
        size = torch.ones(batch, n, 1, device=device, dtype=dtype)
        match = bipartite_soft_matching(x, n // 4, protected=1 if n % 2 else 0)
        args_ = (x, size, match.protected, match.unm_idx, match.src_idx, match.dst_idx)
        moved = (x.numel() + (x.shape[1] - match.r) * batch * c) * x.element_size()  # read x, write the merge
        calls = {k: (lambda k=k: kernels.weighted_merge(*args_, backend=k)) for k in backends}
        rows += [{"size": label, **row} for row in bench_op("weighted_merge", calls, device, repeats, moved)]
    return rows


def bench_unmerging(sizes, backends, device, dtype, repeats, g) -> List[Dict[str, Any]]:
    """3. unmerge and the plain merges: ToMe's mean merge, unmerge and source tracing (amax on the
    [B, N, N] 0/1 source matrix, ViT sizes only) with r = a quarter of the tokens; ToMe-SD's grid merge
    and unmerge (2x2 windows, half the tokens merged, as tomesd's ratio 0.5) where the tokens form a
    square grid. Bandwidth: each row read and written once (unmerge reads N - r rows, writes N)."""
    from accel.patches.tome.merge import initial_source
    from accel.patches.tome.merge2d import bipartite_soft_matching_random2d

    rows = []

    def add(label, name, fn, args, moved):
        calls = {k: (lambda k=k: (fn(*args, backend=k),)) for k in backends}
        rows.extend({"size": label, **row} for row in bench_op(name, calls, device, repeats, moved))

    for label, batch, n, c in sizes:
        x = torch.randn(batch, n, c, generator=g).to(device, dtype)
        item = x.element_size()
        match = bipartite_soft_matching(x, n // 4, protected=1 if n % 2 else 0)
        idx = (match.protected, match.unm_idx, match.src_idx, match.dst_idx)
        kept = n - match.r
        add(label, "mean_merge", kernels.mean_merge, (x,) + idx, (n + kept) * batch * c * item)
        add(label, "unmerge", kernels.unmerge, (match.merge(x),) + idx, (kept + n) * batch * c * item)
        if n <= 1024:  # the source matrix is [B, N, N]
            source = initial_source(batch, n, device, dtype).contiguous()
            add(label, "amax_merge", kernels.amax_merge, (source,) + idx, (n + kept) * batch * n * item)
        side = int(round(n ** 0.5))
        if side * side == n:
            grid = bipartite_soft_matching_random2d(x, side, side, 2, 2, n // 2,
                                                    generator=torch.Generator().manual_seed(0))
            gidx = (grid.a_idx, grid.b_idx, grid.unm_idx, grid.src_idx, grid.dst_idx)
            kept = n - grid.r
            add(label, "mean_merge2d", kernels.mean_merge2d, (x,) + gidx, (n + kept) * batch * c * item)
            add(label, "unmerge2d", kernels.unmerge2d, (grid.merge(x),) + gidx, (kept + n) * batch * c * item)
    return rows


# (label, batch, tokens, channels): ViT-B/16 at 224 px, batch 256 (EViT keeps, token exit and A-ViT
# pack, early exit drops images); DiT-XL/2 at 512 px (1024 tokens, 1152 channels), batch 4 with
# guidance (RegionCache gathers and scatters back)
COMPACTION = [("ViT-B b256", 256, 197, 768), ("DiT-XL/2 512px b4", 4, 1024, 1152)]
COMPACTION_QUICK = [("tiny", 3, 33, 16)]


def bench_compaction(backends, device, dtype, repeats, g, sizes=COMPACTION) -> List[Dict[str, Any]]:
    """4. gather, scatter-back and masked compaction of token rows, about half of them kept: time and
    achieved bandwidth (the rows read and written once)"""
    rows = []
    for label, batch, n, c in sizes:
        item = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(batch, n, c, generator=g).to(device, dtype)
        k = n // 2
        # EViT: half of the tokens after CLS kept, in order; RegionCache: half of all tokens chosen
        kept = torch.rand(batch, n - 1, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.to(device)
        chosen = torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.to(device)
        src = torch.randn(batch, k, c, generator=g).to(device, dtype)
        mask = (torch.rand(batch, n, generator=g) < 0.5).to(device)  # ragged: about half of each image
        count = int(mask.sum())
        stay = (torch.rand(1, batch, generator=g) < 0.5).to(device)  # early exit: about half the images stay
        stay[0, 0] = True
        images, staying = x.reshape(1, batch, n * c), int(stay.sum())
        cases = [
            ("gather_tokens", lambda b: (kernels.gather_tokens(x, kept, 1, backend=b),), 2 * batch * (1 + k) * c),
            ("scatter_tokens", lambda b: (kernels.scatter_tokens(x, chosen, src, backend=b),), 2 * batch * n * c),
            ("compact_tokens", lambda b: kernels.compact_tokens(x, mask, count, backend=b), 2 * count * c),
            ("compact_tokens images", lambda b: kernels.compact_tokens(images, stay, staying, backend=b),
             2 * staying * n * c),
        ]
        for name, call, elements in cases:
            calls = {backend: (lambda backend=backend, call=call: call(backend)) for backend in backends}
            rows += [{"size": label, **row} for row in bench_op(name, calls, device, repeats, elements * item)]
    return rows


# (label, batch, heads, tokens, head_dim): ViT-B/16 after one ToMe r=16 merge, ViT-L/16 at batch 256,
# SD-1.5's first UNet level at 512 and 1024 px (8 heads of 40 channels)
ATTENTION = [("ViT-B b64", 64, 12, 181, 64), ("ViT-L b256", 256, 16, 181, 64),
             ("SD 64x64 b2", 2, 8, 4096, 40), ("SD 128x128 b2", 2, 8, 16384, 40)]
ATTENTION_QUICK = [("tiny", 2, 2, 33, 16)]


def _bias_as_channel(q, k, v, bias):
    """The bias folded into one more head channel (q gains sqrt(D), k the bias; zero-padded to a
    multiple of 8), so SDPA runs without a mask on its flash path: a candidate for the dispatcher."""
    import math

    import torch.nn.functional as F

    d = q.shape[-1]
    width = -(-(d + 1) // 8) * 8
    pad = (0, width - d - 1)
    qf = F.pad(torch.cat([q, q.new_full(q.shape[:-1] + (1,), math.sqrt(d))], -1), pad)
    kf = F.pad(torch.cat([k, bias.to(k.dtype)[:, None, :, None].expand(*k.shape[:-1], 1)], -1), pad)
    vf = F.pad(v, (0, width - d))
    return F.scaled_dot_product_attention(qf, kf, vf, scale=1 / math.sqrt(d))[..., :d]


def bench_attention(sizes, device, dtype, repeats, g) -> List[Dict[str, Any]]:
    """3. attention with a per-key additive bias: SDPA without a mask (the floor), SDPA with the bias
    as a float mask, FlexAttention with a score_mod; the row ``speedup`` is against the float mask."""
    import torch.nn.functional as F

    rows = []
    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as error:  # older torch
        print(f"FlexAttention unavailable: {error}", flush=True)
    for label, batch, heads, n, d in sizes:
        q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(device, dtype) for _ in range(3))
        size = torch.randint(1, 5, (batch, n), generator=g).to(device)
        bias = size.log().to(dtype)
        mask = bias[:, None, None, :]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        calls = {"sdpa float mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                 "sdpa no mask": lambda: F.scaled_dot_product_attention(q, k, v),
                 "triton": lambda: kernels.biased_attention(q, k, v, bias, backend="triton"),
                 "sdpa bias as a channel": lambda: _bias_as_channel(q, k, v, bias)}
        if flex is not None:
            calls["flex score_mod"] = lambda: flex(q, k, v, score_mod=score_mod)
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
        errors = {}
        for name, fn in list(calls.items()):
            try:
                errors[name] = (fn().float() - reference).abs().max().item()
            except Exception as error:
                print(f"{label} {name}: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
                calls.pop(name)
        timings = time_interleaved(calls, repeats=repeats, warmup=2, sync=_sync(device))
        base = timings["sdpa float mask"].median_s
        for name, timing in timings.items():
            rows.append({"size": label, "op": "attention", "backend": name, "ms": 1000 * timing.median_s,
                         "speedup": base / timing.median_s, "max err": errors[name]})
    return rows

if __name__ == "__main__":
    main()
