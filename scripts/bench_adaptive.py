"""Adaptive depth on the built-in ViT: top-1 accuracy against throughput for A-ViT, EViT, per-image
early exit and token exit at several thresholds, side by side with the unpatched model; and
region caching on the built-in DiT pipeline.

ViT part: the trained ``fashion-vit`` (and its A-ViT fine-tune, ``fashion-vit-avit``) on the
Fashion-MNIST test split (10,000 images; the shipped 2,000-image subset when the split is not on
this machine, said in the output). Throughput: every variant and the unpatched model classify the
timing images in batches, interleaved in one process over several rounds (order rotated), medians.
Accuracy: over the whole test split. Writes docs/bench_adaptive.json, docs/bench_adaptive.png
(accuracy against throughput) and the ``bench_adaptive`` section of docs/benchmarks.md; with
--device cuda the ViT part runs on the GPU and writes ``bench_adaptive_cuda`` (and its files).

    python scripts/bench_adaptive.py                    # the full run
    python scripts/bench_adaptive.py --device cuda --region-cache ""   # the ViT part on a GPU
    python scripts/bench_adaptive.py --limit 256 ...    # a smoke run (tests)
    python scripts/bench_adaptive.py --plot-only docs/bench_adaptive.json   # redraw the PNG, no timing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402
from accel.eval.bench import accuracy, device_sync, patched_copy  # noqa: E402
from accel.eval.plot import line_plot  # noqa: E402
from accel.eval.report import (add_device_args, checked_device, device_section, format_table,  # noqa: E402
                               replace_section, run_meta)
from accel.eval.timing import time_interleaved  # noqa: E402

VIT_COLUMNS = [
    ("method", "method", ""),
    ("settings", "settings", ""),
    ("items_s", "img/s", ".1f"),
    ("speedup", "speedup", ".2f"),
    ("accuracy", "top-1", ".4f"),
    ("drop_points", "top-1 lost (points)", "+.2f"),
    ("work", "work done", ""),
]


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def load_test_split(limit: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(images [N, 1, 28, 28] normalised, labels [N], description)``."""
    from accel.pipelines import load_fashion_mnist, load_test_subset
    from accel.pipelines.fashion_vit import preprocess

    try:
        images, labels = load_fashion_mnist("test")
        what = "the Fashion-MNIST test split"
    except FileNotFoundError:
        images, labels = load_test_subset()
        what = "the shipped Fashion-MNIST test subset (the full split is not on this machine)"
    if limit:
        images, labels = images[:limit], labels[:limit]
    return preprocess(images), labels, f"{what}, {len(labels)} images"


def classify(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)]).cpu()


def work_done(model: Any, method: str) -> str:
    """A short reading of ``accel.describe`` after a call: the share of token-blocks computed, or
    the mean depth."""
    info = accel.describe(model)["methods"].get(method, {}).get("last_call") or {}
    if "mean_depth" in info:
        return f"mean depth {info['mean_depth']:.2f}"
    if "mean_exit_block" in info:
        return f"mean exit block {info['mean_exit_block']:.2f}"
    if info.get("tokens_in"):
        tokens = info["tokens_in"]
        return f"{sum(tokens) / (len(tokens) * tokens[0]):.0%} of token-blocks"
    return "-"


def vit_variants(args: argparse.Namespace) -> Dict[str, Tuple[str, str, torch.nn.Module]]:
    """name -> (method, settings, model): every patched model of the table."""
    from accel.pipelines import load

    base = load("fashion-vit").to(args.device)
    variants: Dict[str, Tuple[str, str, torch.nn.Module]] = {}
    if args.avit:
        avit_base, halting = load("fashion-vit-avit")
        avit_base = avit_base.to(args.device)
        variants["avit backbone"] = ("avit backbone", "fine-tuned, unpatched", avit_base)
        for eps in args.avit:
            for mode in ("remove", "mask") if eps == args.avit[0] else ("remove",):
                config = dataclasses.replace(halting, eps=eps, mode=mode)
                variants[f"avit {eps} {mode}"] = ("avit", f"eps {eps}, {mode}", patched_copy(avit_base, avit=config))
    heads = ROOT / "assets" / "fashion-vit-exits"
    if args.exit_budgets:
        sweep = json.loads((heads / "exit_heads.json").read_text())["metrics"]["calibration_sweep"]
        for budget in args.exit_budgets:
            if f"{budget:g}" not in sweep:
                raise SystemExit(f"--exit-budgets: {budget:g} is not in the heads' calibration sweep ({', '.join(sweep)})")
            thresholds = sweep[f"{budget:g}"]["thresholds"]
            variants[f"early_exit budget {budget:g}"] = (
                "early_exit", f"calibrated, held-out drop <= {budget:g}",
                patched_copy(base, early_exit=accel.EarlyExit(heads=heads, thresholds=thresholds)))
    for threshold in args.exit_thresholds:
        variants[f"early_exit {threshold}"] = (
            "early_exit", f"max prob >= {threshold}",
            patched_copy(base, early_exit=accel.EarlyExit(heads=heads, thresholds=threshold, criterion="max_prob")))
    for keep in args.evit:
        variants[f"evit {keep}"] = ("evit", f"keep rate {keep}", patched_copy(base, evit=keep))
    for threshold in args.token_exit:
        variants[f"token_exit {threshold}"] = ("token_exit", f"residual < {threshold}",
                                               patched_copy(base, token_exit=threshold))
    for r in args.tome:
        variants[f"tome {r}"] = ("tome", f"r={int(r)}", patched_copy(base, tome=int(r)))
    return variants


def bench_vit(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], str, int]:
    from accel.pipelines import load

    images, labels, data_note = load_test_split(args.limit)
    images = images.to(args.device)
    timing_images = images[: args.timing_images]
    baseline = load("fashion-vit").to(args.device)
    variants = vit_variants(args)
    calls = {"unpatched": lambda: classify(baseline, timing_images, args.batch)}
    calls.update({name: (lambda m=model: classify(m, timing_images, args.batch))
                  for name, (_, _, model) in variants.items()})
    print(f"timing {len(calls)} variants x {args.repeats} rounds on {len(timing_images)} images", flush=True)
    with torch.inference_mode():
        timings = time_interleaved(calls, repeats=args.repeats, items_per_call=len(timing_images),
                                   sync=device_sync(args.device))
        base_acc = accuracy(classify(baseline, images, args.batch), labels)
        rows = [dict(method="-", settings="unpatched", items_s=timings["unpatched"].items_per_s, speedup=1.0,
                     accuracy=base_acc, drop_points=0.0, work="-")]
        for name, (method, settings, model) in variants.items():
            acc = accuracy(classify(model, images, args.batch), labels)
            model(images[: args.batch])  # "work done" is read from one full batch
            rows.append(dict(method=method, settings=settings, items_s=timings[name].items_per_s,
                             speedup=timings[name].speedup_over(timings["unpatched"]), accuracy=acc,
                             drop_points=100 * (base_acc - acc), work=work_done(model, method)))
    return rows, data_note, len(timing_images)


def bench_dit(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """fashion-dit under RegionCache: s/image, speedup, PSNR against the unpatched images and the
    fraction fashion-vit labels as the requested class (``accel.eval.evaluate``, one image of each
    class per timed call, prompt i drawn with seed ``--seed`` + i)."""
    from accel.eval.evaluation import Judges, evaluate
    from accel.eval.inputs import load_subject
    from accel.eval.spec import Setting
    from accel.pipelines import FASHION_CLASSES, load
    from accel.pipelines.fashion_vit import preprocess

    vit = load("fashion-vit")
    settings = [Setting(f"region_cache {ratio}", {"region_cache": ratio}) for ratio in args.region_cache]
    print(f"fashion-dit: {len(settings) + 1} variants x {args.dit_repeats} rounds, {args.dit_steps} steps", flush=True)
    dit = load_subject("fashion-dit", per_class=args.dit_per_class)
    judges = Judges(classifier=lambda x: vit(preprocess(x)), classifier_name="fashion-vit", labels=dit.labels)
    record = evaluate(dit.model, settings, prompts=dit.prompts, seed=args.seed, steps=args.dit_steps,
                      guidance=args.dit_guidance, batch=len(FASHION_CLASSES), repeats=args.dit_repeats,
                      judges=judges, postprocess=dit.postprocess, name="fashion-dit")
    return [{**row, "steps": args.dit_steps} for row in record["rows"]]


DIT_COLUMNS = [("settings", "settings", ""), ("steps", "steps", ""), ("s_per_image", "s/image", ".3f"),
               ("speedup", "speedup", ".2f"), ("psnr", "PSNR vs unpatched (dB)", ".1f"),
               ("class_accuracy", "class accuracy", ".3f")]


def plot(rows: List[Dict[str, Any]], where: str, path: Path) -> Path:
    """Accuracy against throughput, one line per method, as a PNG at ``path``."""
    series: Dict[str, List[Tuple[float, float]]] = {}
    for row in rows:
        series.setdefault(row["method"] if row["method"] != "-" else "unpatched", []).append(
            (row["items_s"], 100 * row["accuracy"]))
    return line_plot(series, path, title="fashion-vit: accuracy against throughput", xlabel=f"images/s ({where})",
                     ylabel="top-1 accuracy (%)")


def plot_only(record: Path) -> Path:
    """Redraw the PNG beside a JSON record this script wrote, without measuring anything."""
    data = json.loads(record.read_text())
    # Records older than the "where" key: the machine description ("x86_64 CPU, 2 threads; ..." or
    # "NVIDIA H100 80GB HBM3 (CUDA 13.0), x86_64 host; ...") up to the versions, or the GPU's name.
    where = data.get("where") or data["meta"]["machine"].split(";")[0].split(" (CUDA")[0]
    return plot(data["rows"], where, record.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--avit", type=_floats, default=[0.01, 0.1, 0.3],
                        help="A-ViT eps values (fashion-vit-avit); the first is also timed with the masked path")
    parser.add_argument("--exit-budgets", type=_floats, default=[0.0025, 0.005, 0.01, 0.02],
                        help="held-out accuracy-drop budgets whose calibrated thresholds the shipped exit heads carry")
    parser.add_argument("--exit-thresholds", type=_floats, default=[], help="uniform max-prob thresholds, in addition")
    parser.add_argument("--evit", type=_floats, default=[0.9, 0.7, 0.5], help="EViT keep rates")
    parser.add_argument("--token-exit", type=_floats, default=[0.1, 0.2, 0.3], help="token-exit thresholds")
    parser.add_argument("--tome", type=_floats, default=[2.0, 4.0], help="ToMe r values, for comparison")
    parser.add_argument("--region-cache", type=_floats, default=[0.5, 0.25], help="RegionCache ratios (fashion-dit)")
    parser.add_argument("--dit-steps", type=int, default=20)
    parser.add_argument("--dit-guidance", type=float, default=4.0)
    parser.add_argument("--dit-per-class", type=int, default=5, help="images per class for PSNR and class accuracy")
    parser.add_argument("--dit-repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--timing-images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    add_device_args(parser, half=False, help="cpu or cuda (the ViT part; fp32 either way)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the JSON, PNG and benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--plot-only", type=Path, metavar="JSON",
                        help="redraw the PNG beside this JSON record (same name, .png) and measure nothing")
    args = parser.parse_args()
    if args.plot_only:
        print(plot_only(args.plot_only))
        return
    gpu = checked_device(parser, args)
    torch.manual_seed(args.seed)

    rows, data_note, timed = bench_vit(args)
    table = format_table(rows, VIT_COLUMNS)
    print(table)
    dit_rows = bench_dit(args) if args.region_cache else []
    dit_table = format_table(dit_rows, DIT_COLUMNS) if dit_rows else ""
    print(dit_table)
    if args.no_write:
        return
    meta = run_meta(" ".join(["python scripts/bench_adaptive.py"] + sys.argv[1:]), args.seed, "timm",
                    device=args.device)
    meta["weights"] = "the trained built-in models (assets/)"
    name = device_section("bench_adaptive", gpu)
    args.out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(args.device) if gpu else f"{torch.get_num_threads()}-thread CPU"
    (args.out / f"{name}.json").write_text(json.dumps(
        {"meta": meta, "data": data_note, "where": where, "rows": rows, "dit_rows": dit_rows}, indent=2) + "\n")
    plot(rows, where, args.out / f"{name}.png")
    section = (
        f"Measured {meta['date']} on {meta['machine']}. fp32, trained weights; accuracy on {data_note}; "
        f"throughput on the first {timed} of them in "
        f"batches of {args.batch}, every variant interleaved with the unpatched model over {args.repeats} "
        f"rounds, medians.\n\nCommand: `{meta['command']}`\n\n{table}\n\n![accuracy against throughput]"
        f"({name}.png)\n"
    )
    if dit_rows:
        section += (
            f"\nRegionCache on fashion-dit ({args.dit_steps} DDIM steps, guidance {args.dit_guidance}): speed on one "
            f"image of each class per call, {args.dit_repeats} interleaved rounds, medians; PSNR against the "
            f"unpatched images and class accuracy (fashion-vit) on {args.dit_per_class} images per class with "
            f"fixed seeds.\n\n{dit_table}\n"
        )
    replace_section(args.out / "benchmarks.md", name, section)


if __name__ == "__main__":
    main()
