"""Command line: ``accel bench`` (the main job) and ``accel info``."""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["main"]

BUILT_IN_VIT = "fashion-vit"
BUILT_IN_DIFFUSION = ("fashion-sd", "fashion-dit")
DEFAULT_MODEL = "built-in"  # all of the above, one table each
DEFAULT_R_BUILT_IN = [1, 2, 3]  # 50 tokens, 12 blocks
DEFAULT_R_TIMM = [8, 16]  # 197 tokens, 12 blocks


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


def _bench_inputs(args: argparse.Namespace):
    """(model, timing inputs, check inputs, labels or None, description) for ``--model``."""
    import torch

    if args.model == BUILT_IN_VIT:
        from .pipelines import load, load_test_subset
        from .pipelines.fashion_vit import preprocess

        images, labels = load_test_subset()
        n = min(args.eval_images, len(images))
        return (load(BUILT_IN_VIT), preprocess(images[: args.batch]), preprocess(images[:n]), labels[:n],
                f"model: {BUILT_IN_VIT} (built-in timm ViT trained on Fashion-MNIST; accuracy on {n} images "
                f"of the shipped test subset)")
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
    inputs = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(args.seed))
    return (model, inputs, inputs, None,
            f"model: {args.model} (timm, seeded random weights, seed {args.seed}: no network, no trained "
            f"checkpoint; speed is real, agreement is measured on random weights)")


def diffusion_variants(name: str) -> Dict[str, Dict[str, Any]]:
    """The settings ``accel bench`` compares on a built-in diffusion pipeline: {label: patch keywords}."""
    from . import ToMe

    if name == "fashion-sd":
        return {"tome 0.5": {"tome": 0.5}, "deepcache 3": {"deepcache": 3}, "deepcache 5": {"deepcache": 5},
                "tome 0.5 + deepcache 3": {"tome": 0.5, "deepcache": 3}}
    return {"tome 0.5": {"tome": 0.5}, "tome downsample 2x (ToDo)": {"tome": ToMe(mode="downsample")}}


def _diffusion_judges(args: argparse.Namespace) -> Dict[str, Any]:
    """What scores generated images, loaded once for every pipeline: the classifier, the CLIP
    scorer and the real test images' FID statistics."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .eval.clip_score import ClipScorer
    from .eval.fid import FidReference
    from .pipelines import load, load_test_subset
    from .pipelines.fashion_vit import preprocess

    diffusers_logging.disable_progress_bar()  # loading bars would interleave with the table
    transformers_logging.disable_progress_bar()
    vit = load(BUILT_IN_VIT)
    real, _ = load_test_subset()
    real = real[: args.fid_real]
    return {"classifier": lambda x: vit(preprocess(x)), "clip_scorer": ClipScorer(),
            "fid_reference": FidReference(real), "real_count": len(real)}


def _bench_diffusion(name: str, args: argparse.Namespace, judges: Dict[str, Any]) -> str:
    from .eval.diffusion import DIFFUSION_COLUMNS, bench_diffusion, image_grid
    from .eval.report import format_table
    from .pipelines import FASHION_CLASSES, load, prompt_for
    from .pipelines.fashion_sd import generate

    pipe = load(name)
    n = args.per_class * len(FASHION_CLASSES)
    print(f"model: {name} (built-in diffusers pipeline trained on Fashion-MNIST), {args.steps} steps, guidance "
          f"{args.guidance}; speed: one image of each class per call, {args.diffusion_repeats} interleaved rounds, "
          f"medians; quality on {n} images with fixed seeds: PSNR against the unpatched image, FID against "
          f"{judges['real_count']} test images (Inception-v3 features), CLIP score (fashion-clip), class accuracy "
          f"(fashion-vit)")
    rows, images = bench_diffusion(
        pipe, diffusion_variants(name), model_name=name, num_classes=len(FASHION_CLASSES), steps=args.steps,
        per_class=args.per_class, repeats=args.diffusion_repeats, prompts=prompt_for,
        generate=lambda p, labels, steps: generate(p, labels, steps, args.guidance, seed=args.seed),
        fid_reference=judges["fid_reference"], classifier=judges["classifier"], clip_scorer=judges["clip_scorer"],
    )
    print(format_table([row.as_dict() for row in rows], DIFFUSION_COLUMNS, style="text"))
    grid = image_grid(images, Path(args.out) / f"{name}-grid.png", columns=range(0, n, args.per_class))
    print(f"image grid (one row per setting, one column per class): {grid}\n")
    return format_table([row.as_dict() for row in rows], DIFFUSION_COLUMNS)


def _bench(args: argparse.Namespace) -> int:
    if args.model == DEFAULT_MODEL:
        tables = [_bench_vit(argparse.Namespace(**{**vars(args), "model": BUILT_IN_VIT}))]
        judges = _diffusion_judges(args)
        tables += [_bench_diffusion(name, args, judges) for name in BUILT_IN_DIFFUSION]
    elif args.model in BUILT_IN_DIFFUSION:
        tables = [_bench_diffusion(args.model, args, _diffusion_judges(args))]
    else:
        tables = [_bench_vit(args)]
    if args.report:
        import datetime

        from .eval.report import machine_description, replace_section

        argv = [a for a in args.argv[1:] if not a.startswith("--report") and a != args.report]
        command = " ".join(["accel bench"] + argv)
        replace_section(Path(args.report), "accel_bench", (
            f"Measured {datetime.date.today().isoformat()} on {machine_description()}. Command: `{command}`\n\n"
            + "\n\n".join(tables)))
        print(f"wrote the tables to {args.report}")
    return 0


def _bench_vit(args: argparse.Namespace) -> str:
    import torch

    from . import ToMe
    from .eval.bench import compare_variants, patched_copy
    from .eval.report import ACCURACY_COLUMNS, BENCH_COLUMNS, format_table

    model, inputs, check, labels, description = _bench_inputs(args)
    rs = args.r or (DEFAULT_R_BUILT_IN if args.model == BUILT_IN_VIT else DEFAULT_R_TIMM)
    print(description)
    print(f"input: batch {tuple(inputs.shape)} fp32, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved rounds, medians\n")
    variants = {f"r={r}": patched_copy(model, tome=ToMe(r=r)) for r in rs}
    rows = compare_variants(model, variants, inputs, model_name=args.model, method="tome",
                            repeats=args.repeats, agreement_inputs=check, labels=labels)
    columns = BENCH_COLUMNS if labels is None else ACCURACY_COLUMNS
    print(format_table([row.as_dict() for row in rows], columns, style="text") + "\n")
    return format_table([row.as_dict() for row in rows], columns)


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .api import available_methods

    print(f"accel {__version__} on Python {platform.python_version()}, torch {torch.__version__}")
    for name in ("timm", "diffusers", "transformers", "triton"):
        try:
            module = __import__(name)
            print(f"  {name} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"  {name}: not installed")
    print(f"methods: {', '.join(available_methods())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="speed and agreement of each method against the unpatched model")
    bench.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"{DEFAULT_MODEL} (the default: {BUILT_IN_VIT}, {', '.join(BUILT_IN_DIFFUSION)}, trained "
                            f"and shipped), one of those, or a timm model name (random weights)")
    bench.add_argument("--batch", type=int, default=64, help="images per timed call (default 64)")
    bench.add_argument("--r", type=_int_list, default=None,
                       help=f"ToMe r values, comma-separated (default {','.join(map(str, DEFAULT_R_BUILT_IN))} for "
                            f"{BUILT_IN_VIT}, {','.join(map(str, DEFAULT_R_TIMM))} for timm models)")
    bench.add_argument("--eval-images", type=int, default=2000, help="test-subset images for accuracy (built-in)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--report", default=None, help="also write the tables (Markdown) into this file's "
                                                      "accel_bench section, e.g. docs/benchmarks.md")
    diffusion = bench.add_argument_group("diffusion pipelines")
    diffusion.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    diffusion.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    diffusion.add_argument("--per-class", type=int, default=10, help="images per class for quality (default 10)")
    diffusion.add_argument("--fid-real", type=int, default=500, help="real test images for FID (default 500)")
    diffusion.add_argument("--diffusion-repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    diffusion.add_argument("--out", default="accel-bench", help="folder for the image grids (default accel-bench/)")
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="versions and available methods")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    for option in ("batch", "repeats", "steps", "per_class", "fid_real", "diffusion_repeats"):
        if getattr(args, option, 1) < 1:
            print(f"accel: --{option.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
