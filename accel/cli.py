"""Command line: ``accel bench`` (the main job) and ``accel info``."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

__all__ = ["main"]

DEFAULT_MODEL = "vit_base_patch16_224"


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    import torch
    import timm

    from . import ToMe
    from .eval.bench import compare_variants, patched_copy
    from .eval.report import BENCH_COLUMNS, format_table

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    inputs = torch.randn(args.batch, *cfg, generator=torch.Generator().manual_seed(args.seed))
    print(
        f"model: {args.model} (timm, seeded random weights, seed {args.seed}: no network, no trained "
        f"checkpoint; speed is real, agreement is measured on random weights)"
    )
    print(f"input: {args.batch} x {tuple(cfg)} fp32, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved rounds, medians\n")
    variants = {f"r={r}": patched_copy(model, tome=ToMe(r=r)) for r in args.r}
    rows = compare_variants(model, variants, inputs, model_name=args.model, method="tome", repeats=args.repeats)
    print(format_table([row.as_dict() for row in rows], BENCH_COLUMNS, style="text"))
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
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    bench.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    bench.add_argument("--r", type=_int_list, default=[8, 16], help="ToMe r values, comma-separated (default 8,16)")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
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
