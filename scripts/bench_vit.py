"""ToMe on timm ViTs: images/s and speedup against the unpatched model (fused SDPA attention).

Baseline and every setting run interleaved in one process (medians of rounds), on seeded random
weights, fp32 on the CPU. Writes docs/bench_vit.json and the ``bench_vit`` section of
docs/benchmarks.md; on a GPU (--device cuda), docs/bench_vit_cuda.json and ``bench_vit_cuda``.

    python scripts/bench_vit.py                       # ViT-S/16 and ViT-B/16, batch 1 and 32, r 0/8/13/16
    python scripts/bench_vit.py --device cuda --dtype float16 --batches 1,64,256 --models vit_base_patch16_224,vit_large_patch16_224
    python scripts/bench_vit.py --tome-original DIR   # also the original ToMe code (a checkout of
                                                      # facebookresearch/ToMe at DIR), same r values
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402
from accel.eval.bench import compare_variants, patched_copy  # noqa: E402
from accel.eval.report import (BENCH_COLUMNS, add_device_args, checked_device, device_section,  # noqa: E402
                               format_table, replace_section, run_meta)


def _list(cast):
    return lambda text: [cast(v) for v in text.split(",") if v.strip()]


def original_tome_copy(model: torch.nn.Module, r: int, tome_dir: Path) -> torch.nn.Module:
    """A deep copy patched by the original ToMe code: ``tome.patch.timm(model); model.r = r``."""
    if str(tome_dir) not in sys.path:
        sys.path.insert(0, str(tome_dir))
    import tome  # the original package, from the checkout

    patched = copy.deepcopy(model)
    tome.patch.timm(patched)
    patched.r = r
    return patched


def bench_model(name: str, batches: List[int], rs: List[int], args: argparse.Namespace) -> List[Dict[str, Any]]:
    import timm

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model = timm.create_model(name, pretrained=False).eval().to(device=args.device, dtype=dtype)
    shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
    gen = torch.Generator().manual_seed(args.seed)

    def randn(*size: int) -> torch.Tensor:  # drawn on the CPU: the same images on every device
        return torch.randn(*size, generator=gen).to(device=args.device, dtype=dtype)

    agreement_inputs = randn(args.agreement_batch, *shape)
    variants = {f"r={r}": patched_copy(model, tome=accel.ToMe(r=r)) for r in rs}
    if args.tome_original:
        for r in rs:
            if r > 0:
                variants[f"original ToMe r={r}"] = original_tome_copy(model, r, args.tome_original)
    rows = []
    for batch in batches:
        inputs = randn(batch, *shape)
        repeats = args.repeats if batch > 1 else args.repeats_batch1
        print(f"{name} batch {batch}: {len(variants) + 1} variants x {repeats} rounds", flush=True)
        for row in compare_variants(model, variants, inputs, model_name=name, method="tome",
                                    repeats=repeats, agreement_inputs=agreement_inputs):
            rows.append(row.as_dict())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_list(str), default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batches", type=_list(int), default=[1, 32])
    parser.add_argument("--r", type=_list(int), default=[0, 8, 13, 16])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds for batch > 1")
    parser.add_argument("--repeats-batch1", type=int, default=30, help="interleaved rounds for batch 1")
    parser.add_argument("--agreement-batch", type=int, default=32, help="images for top-1 agreement/cosine")
    parser.add_argument("--seed", type=int, default=0)
    add_device_args(parser)
    parser.add_argument("--tome-original", type=Path, default=None, help="checkout of facebookresearch/ToMe")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the JSON and benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    gpu = checked_device(parser, args)

    rows: List[Dict[str, Any]] = []
    for name in args.models:
        rows += bench_model(name, args.batches, args.r, args)
    table = format_table(rows, BENCH_COLUMNS)
    print(table)
    if args.no_write:
        return
    meta = run_meta(" ".join(["python scripts/bench_vit.py"] + sys.argv[1:]), args.seed, "timm",
                    device=args.device, dtype=args.dtype)
    machine = meta["machine"]
    name = device_section("bench_vit", gpu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    section = (
        f"Measured {meta['date']} on {machine}. {args.dtype}, {meta['weights']} weights, baseline = the unpatched "
        f"timm model (fused SDPA attention), interleaved in one process, medians. Agreement: on "
        f"{args.agreement_batch} seeded random images against the unpatched model's logits.\n\n"
        f"Command: `{meta['command']}`\n\n{table}\n"
    )
    replace_section(args.out / "benchmarks.md", name, section)
    if args.out.resolve() == (ROOT / "docs").resolve() and not gpu:
        replace_section(ROOT / "README.md", "readme_figures", readme_summary(rows, meta))


def readme_summary(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The largest-batch rows, compactly, for the README."""
    largest = max(row["batch"] for row in rows)
    columns = [("model", "model", ""), ("settings", "settings", ""), ("speedup", "speedup", ".2f"),
               ("items_s", "img/s", ".2f"), ("baseline_items_s", "unpatched img/s", ".2f"),
               ("logit_cosine", "logit cosine", ".4f")]
    picked = [row for row in rows if row["batch"] == largest and row["settings"] != "r=0"]
    return f"Batch {largest}, measured {meta['date']}:\n\n" + format_table(picked, columns)


if __name__ == "__main__":
    main()
