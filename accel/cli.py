"""Command line: ``accel bench`` (the main job) and ``accel info``."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

__all__ = ["main"]

BUILT_IN_VIT = "fashion-vit"
DEFAULT_MODEL = BUILT_IN_VIT
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


def _bench(args: argparse.Namespace) -> int:
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
    print(format_table([row.as_dict() for row in rows], columns, style="text"))
    return 0


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
                       help=f"{BUILT_IN_VIT} (built-in, trained; the default) or a timm model name (random weights)")
    bench.add_argument("--batch", type=int, default=64, help="images per timed call (default 64)")
    bench.add_argument("--r", type=_int_list, default=None,
                       help=f"ToMe r values, comma-separated (default {','.join(map(str, DEFAULT_R_BUILT_IN))} for "
                            f"{BUILT_IN_VIT}, {','.join(map(str, DEFAULT_R_TIMM))} for timm models)")
    bench.add_argument("--eval-images", type=int, default=2000, help="test-subset images for accuracy (built-in)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="versions and available methods")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch", 1) < 1 or getattr(args, "repeats", 1) < 1:
        print("accel: --batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
