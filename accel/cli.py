"""Command line: ``accel bench`` (the main job), ``accel eval``, ``accel tune`` and ``accel info``."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "diffusion_variants", "QUICK", "FULL", "TIMM"]

BUILT_IN_VIT = "fashion-vit"
BUILT_IN_DIFFUSION = ("fashion-sd", "fashion-dit")
DEFAULT_MODEL = "built-in"  # the built-in models, one table each
PACKAGES = ("timm", "diffusers", "transformers")  # whose versions a report names

# Settings of the built-in run. The quick run (the default, what `make run` runs) keeps the settings
# where the methods pay: ToMe r=2..4 (under 1.1 points of accuracy), the shipped early-exit heads and
# A-ViT fine-tune on fashion-vit, DeepCache on fashion-sd. fashion-vit is timed at batch 256, as in
# scripts/bench_adaptive.py: a call lasts about half a second, and beside a competing busy process
# the ToMe rows kept their order there, not at batch 64. FID is left out: its Inception pass over
# 500 real and 100 generated images per row took longer than the rest of the run, and FID on 100
# images cannot resolve the differences at stake; PSNR, CLIP score and class accuracy stay.
# --full is the complete run, including the rows that lose on models this small.
QUICK = dict(batch=256, r=[2, 3, 4], repeats=10, eval_images=2000, per_class=10, fid_real=0, diffusion_repeats=5,
             diffusion=("fashion-sd",))
FULL = dict(batch=64, r=[1, 2, 3], repeats=5, eval_images=2000, per_class=10, fid_real=500, diffusion_repeats=3,
            diffusion=BUILT_IN_DIFFUSION)
TIMM = dict(batch=64, r=[8, 16], repeats=5)  # 197 tokens, 12 blocks

# Seconds on the idle 2-core CPU (docs/benchmarks.md, accel_bench), for the estimate printed first:
# start-up, one fashion-vit image at batch 256, one generated 28x28 image at 20 steps, one FID image.
_COST = dict(start=10.0, vit_image=2.3e-3, generate={"fashion-sd": 0.12, "fashion-dit": 0.075}, fid_image=0.12)
# Cost of a setting relative to the unpatched model, as measured; unknown settings count as 1.
_RELATIVE = {"deepcache 3": 0.5, "deepcache 5": 0.36, "tome 0.5 + deepcache 3": 0.52, "tome 0.5": 1.1,
             "tome downsample 2x (ToDo)": 1.05, "early exit": 0.25, "avit": 0.5}


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


def diffusion_variants(name: str, full: bool = True) -> Dict[str, Dict[str, Any]]:
    """The settings ``accel bench`` compares on a built-in diffusion pipeline: {label: patch keywords}.
    The quick run keeps fashion-sd's DeepCache rows; ToMe does not pay on these small latents."""
    from . import ToMe

    if name == "fashion-sd":
        if not full:
            return {"deepcache 3": {"deepcache": 3}, "deepcache 5": {"deepcache": 5}}
        return {"tome 0.5": {"tome": 0.5}, "deepcache 3": {"deepcache": 3}, "deepcache 5": {"deepcache": 5},
                "tome 0.5 + deepcache 3": {"tome": 0.5, "deepcache": 3}}
    return {"tome 0.5": {"tome": 0.5}, "tome downsample 2x (ToDo)": {"tome": ToMe(mode="downsample")}}


def estimate_seconds(args: argparse.Namespace) -> float:
    """Rough seconds the built-in run with ``args`` takes on an idle 2-core CPU (from ``_COST``)."""
    vit = [1.0] + [1 / (1 + r / 3) for r in args.r] + [_RELATIVE["early exit"], _RELATIVE["avit"]]
    seconds = _COST["start"] + _COST["vit_image"] * sum(vit) * (args.batch * (1 + args.repeats) + args.eval_images)
    for name in args.diffusion:
        relative = [1.0] + [_RELATIVE.get(label, 1.0) for label in diffusion_variants(name, args.full)]
        images = 10 * (1 + args.diffusion_repeats) + 10 * args.per_class
        seconds += _COST["generate"][name] * args.steps / 20 * images * sum(relative)
        if args.fid_real:
            seconds += _COST["fid_image"] * 10 * args.per_class * len(relative)
    return seconds + (_COST["fid_image"] * args.fid_real if args.fid_real and args.diffusion else 0.0)


def _show(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]], name: str,
          used: Optional[float]) -> str:
    """Print ``rows`` as a text table, after the CPU reading of their timing (``used``: CPU seconds
    per wall second) and, when the machine was busy, a warning; return the same as Markdown.
    Columns with no value in any row are left out."""
    import torch

    from .eval.report import format_table
    from .eval.timing import busy_warning

    threads = torch.get_num_threads()
    lines = [f"{name}: CPU use while timing: {used:.2f} of {threads} threads"] if used is not None else []
    warning = busy_warning(used, threads)
    text = format_table(rows, columns, style="text", drop_empty=True)
    print("\n".join(lines + ([warning] if warning else []) + [text]) + "\n")
    markdown = [f"**{warning}**"] if warning else []
    markdown += [format_table(rows, columns, drop_empty=True)] + [line + "." for line in lines]
    return "\n\n".join(markdown)


def _evaluated(args: argparse.Namespace, name: str, model: Any, settings: List[Any], **data: Any) -> Dict[str, Any]:
    """``accel eval``'s code path on one built-in or timm model; its report goes to ``--out/<name>``."""
    from .eval.evaluation import evaluate
    from .eval.outputs import write_report
    from .eval.progress import say

    record = evaluate(model, settings, name=name, progress=name, log=say, **data)
    paths = write_report(record, Path(args.out) / name, grid_rows=10)
    print(f"report (JSON, Markdown, plots{', image grid' if 'grid' in paths else ''}): {paths['json'].parent}")
    return record


def _bench_vit(args: argparse.Namespace) -> str:
    import torch

    from . import ToMe
    from .eval.report import ACCURACY_COLUMNS, BENCH_COLUMNS
    from .eval.spec import Setting

    settings = [Setting(f"r={r}", {"tome": ToMe(r=r)}) for r in args.r]
    if args.model == BUILT_IN_VIT:
        from .pipelines import load, load_test_subset
        from .pipelines.data import ASSETS
        from .pipelines.fashion_vit import preprocess

        images, labels = load_test_subset()
        n = min(args.eval_images, len(images))
        model, labels, check = load(BUILT_IN_VIT), labels[:n], preprocess(images[:n])
        avit_model, halting = load("fashion-vit-avit")
        # The shipped heads' thresholds were calibrated to lose at most 0.5 points on held-out images.
        settings += [Setting("shipped exit heads", {"early_exit": str(ASSETS / "fashion-vit-exits")}),
                     Setting(f"eps {halting.eps:g}", {"avit": halting}, model=avit_model)]
        print(f"model: {BUILT_IN_VIT} (built-in timm ViT trained on Fashion-MNIST; accuracy on {n} images of the "
              f"shipped test subset; early exit with its shipped calibrated heads, A-ViT with fashion-vit-avit, "
              f"its fine-tune for halting)")
    else:
        import timm

        torch.manual_seed(args.seed)
        model = timm.create_model(args.model, pretrained=False).eval()
        shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
        check = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(args.seed))
        labels = None
        print(f"model: {args.model} (timm, seeded random weights, seed {args.seed}: no network, no trained "
              f"checkpoint; speed is real, agreement is measured on random weights)")
    print(f"input: batch {(args.batch,) + tuple(check.shape[1:])} fp32, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved rounds, medians")
    record = _evaluated(args, args.model, model, settings, images=check, labels=labels, batch=args.batch,
                        repeats=args.repeats)
    rows = record["rows"]
    base = 1 / rows[0]["s_per_image"]
    table = [{"model": args.model, "batch": args.batch, "method": row["method"], "settings": row["settings"],
              "baseline_items_s": base, "items_s": 1 / row["s_per_image"], **row} for row in rows[1:]]
    return _show(table, BENCH_COLUMNS if labels is None else ACCURACY_COLUMNS, args.model,
                 record["meta"]["timing"][0]["cpu_per_wall"])


def _diffusion_judges(args: argparse.Namespace) -> Any:
    """What scores generated images, loaded once for every pipeline (``accel eval``'s judges): the
    classifier, fashion-clip and (with ``--fid-real``) the Inception features and the real test
    images. Both pipelines' prompts are of the same classes, in the same order."""
    from .eval.inputs import class_prompts, make_judges

    return make_judges(reference="fashion-mnist" if args.fid_real else None, reference_limit=args.fid_real,
                       fid=bool(args.fid_real), labels=class_prompts(BUILT_IN_DIFFUSION[0], args.per_class)[1])


def _bench_diffusion(name: str, args: argparse.Namespace, judges: Any) -> str:
    from .eval.inputs import load_subject
    from .eval.report import DIFFUSION_COLUMNS
    from .eval.spec import Setting
    from .pipelines import FASHION_CLASSES

    subject = load_subject(name, per_class=args.per_class)
    fid = f"FID against {judges.reference_name} (Inception-v3 features), " if judges.features is not None else ""
    print(f"model: {name} (built-in diffusers pipeline trained on Fashion-MNIST), {args.steps} steps, guidance "
          f"{args.guidance}; speed: one image of each class per call, {args.diffusion_repeats} interleaved rounds, "
          f"medians; quality on {len(subject.prompts)} images, prompt i with seed {args.seed} + i: PSNR and SSIM against "
          f"the unpatched image, {fid}CLIP score (fashion-clip), class accuracy (fashion-vit)")
    settings = [Setting(label, methods) for label, methods in diffusion_variants(name, args.full).items()]
    record = _evaluated(args, name, subject.model, settings, prompts=subject.prompts, seed=args.seed,
                        steps=args.steps, guidance=args.guidance, batch=len(FASHION_CLASSES),
                        repeats=args.diffusion_repeats, judges=judges, postprocess=subject.postprocess)
    table = [{"model": name, "steps": args.steps, **row,
              "fid": (row["fid_vs_reference"] or {}).get("value")} for row in record["rows"]]
    return _show(table, DIFFUSION_COLUMNS, name, record["meta"]["timing"][0]["cpu_per_wall"])


def _bench_llm(args: argparse.Namespace) -> str:
    from .eval.llm import bench_study_models

    print("models: study-dense, study-moe, study-mod (small Llamas trained by the project on the Python "
          "documentation, equal training compute; held-out loss on 64 windows of 256 held-out tokens shipped "
          f"with them; greedy decoding of 4 prompts x 64 tokens at batch 1, {args.repeats} interleaved rounds, "
          "medians)")
    record = bench_study_models(repeats=args.repeats, count=64)
    columns = [("model", "model", ""), ("parameters", "parameters", ",d"),
               ("forward MFLOPs per token", "forward MFLOPs per token", ".2f"), ("held-out loss", "held-out loss", ".3f"),
               ("predictor agreement", "MoD predictor = top-k", ".3f"), ("decode tokens/s", "decode tokens/s", ".1f"),
               ("decode speedup", "decoding vs dense", ".2f")]
    return _show(record["rows"], columns, "study models", record["cpu_per_wall"])


def _bench(args: argparse.Namespace) -> int:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .eval.progress import duration

    started, load_average = time.perf_counter(), os.getloadavg()[0]
    diffusers_logging.disable_progress_bar()  # loading bars would interleave with the tables
    transformers_logging.disable_progress_bar()
    if args.llm:
        tables = [_bench_llm(args)]
    elif args.model == DEFAULT_MODEL:
        other = _resolve(build_parser().parse_args(["bench"] + ([] if args.full else ["--full"])))
        what, alternative = (("every setting on every built-in model, with FID", "the quick run, without --full")
                             if args.full else ("the built-in models at the settings where the methods pay",
                                                "every setting with FID, --full"))
        print(f"accel bench: {what}; about {duration(estimate_seconds(args))} on an idle 2-core CPU "
              f"({alternative}: about {duration(estimate_seconds(other))})\n")
        tables = [_bench_vit(argparse.Namespace(**{**vars(args), "model": BUILT_IN_VIT}))]
        judges = _diffusion_judges(args)
        tables += [_bench_diffusion(name, args, judges) for name in args.diffusion]
    elif args.model in BUILT_IN_DIFFUSION:
        tables = [_bench_diffusion(args.model, args, _diffusion_judges(args))]
    else:
        tables = [_bench_vit(args)]
    if args.report:
        import datetime

        from .eval.report import machine_description, replace_section

        argv = [a for a in args.argv[1:] if not a.startswith("--report") and a != args.report]
        command = " ".join(["accel bench"] + argv)
        minutes = (time.perf_counter() - started) / 60
        # The quick run and --full keep their own sections, so that the docs show both.
        section = "accel_bench_llm" if args.llm else "accel_bench_full" if args.full else "accel_bench"
        replace_section(Path(args.report), section, (
            f"Measured {datetime.date.today().isoformat()} on {machine_description(*PACKAGES)}; load average "
            f"{load_average:.2f} at the start. Command: `{command}` (the whole run: {minutes:.1f} minutes)\n\n"
            + "\n\n".join(tables)))
        print(f"wrote the tables to {args.report} (section {section})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("accel demo: needs gradio: pip install 'accel-toolkit[demo]'", file=sys.stderr)
        return 2
    from .demo import found_tune_results, launch

    tuned = [Path(p) for p in args.tuned] if args.tuned is not None else found_tune_results()
    launch(args.host, args.port, tuned=tuned, block=True)
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, available_methods

    print(f"accel {__version__} on Python {platform.python_version()}, torch {torch.__version__}")
    for name in ("timm", "diffusers", "transformers", "triton"):
        try:
            module = __import__(name)
            print(f"  {name} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"  {name}: not installed")
    print(f"methods: {', '.join(available_methods())}")
    return 0


def _defaults(key: str) -> str:
    """An option's defaults for its help: ``"default 256; with --full 64; for timm models 64"``."""
    def show(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    text = f"default {show(QUICK[key])}" + (f"; with --full {show(FULL[key])}" if FULL[key] != QUICK[key] else "")
    return text + (f"; for timm models {show(TIMM[key])}" if key in TIMM and TIMM[key] != QUICK[key] else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench", help="speed and quality of each method against the unpatched model",
        description="Speed (interleaved side-by-side timing, medians) and quality of each method against the "
                    "unpatched model. The default is a quick run of the settings where the methods pay on the "
                    "built-in models (about 80 s on an idle 2-core CPU); --full runs every setting, FID and "
                    "fashion-dit (about 5 minutes). Progress bars go to stderr (TQDM_DISABLE=1 turns them off), "
                    "the tables to stdout; a table timed on a busy machine comes with a warning.")
    bench.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"{DEFAULT_MODEL} (the default: {BUILT_IN_VIT} and {', '.join(BUILT_IN_DIFFUSION)}, "
                            f"trained and shipped), one of those, or a timm model name (random weights)")
    bench.add_argument("--full", action="store_true",
                       help="the complete run on the built-in models: every setting (including those that do not "
                            "pay on models this small), FID, fashion-dit")
    bench.add_argument("--llm", action="store_true",
                       help="the built-in language models instead: the study's dense, Mixture-of-Experts and "
                            "Mixture-of-Depths models (held-out loss, forward FLOPs, greedy decoding speed)")
    bench.add_argument("--batch", type=int, default=None,
                       help=f"images per timed call ({_defaults('batch')})")
    bench.add_argument("--r", type=_int_list, default=None,
                       help=f"ToMe r values, comma-separated ({_defaults('r')})")
    bench.add_argument("--eval-images", type=int, default=None,
                       help=f"test-subset images for accuracy (built-in; {_defaults('eval_images')})")
    bench.add_argument("--repeats", type=int, default=None,
                       help=f"interleaved timing rounds ({_defaults('repeats')})")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--report", default=None, help="also write the tables (Markdown) into this file's "
                                                      "accel_bench section, e.g. docs/benchmarks.md")
    diffusion = bench.add_argument_group("diffusion pipelines")
    diffusion.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    diffusion.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    diffusion.add_argument("--per-class", type=int, default=None,
                           help=f"images per class for quality ({_defaults('per_class')})")
    diffusion.add_argument("--fid-real", type=int, default=None,
                           help=f"real test images for FID, 0 for no FID ({_defaults('fid_real')})")
    diffusion.add_argument("--diffusion-repeats", type=int, default=None,
                           help=f"interleaved timing rounds ({_defaults('diffusion_repeats')})")
    diffusion.add_argument("--out", default="accel-bench", help="folder for the image grids (default accel-bench/)")
    bench.set_defaults(func=_bench)
    from .eval.commands import add_eval_parser, add_tune_parser

    add_eval_parser(sub)
    add_tune_parser(sub)
    demo = sub.add_parser("demo", help="a Gradio app: unpatched and patched side by side, and what the method did",
                          description="Runs offline on the built-in models (or your pipeline: type its folder or "
                                      "cached hub id as the model). Needs the demo extra: pip install "
                                      "'accel-toolkit[demo]'.")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=None, help="port (default GRADIO_SERVER_PORT, else 7860)")
    demo.add_argument("--tuned", nargs="*", default=None,
                      help="accel tune results (tune.json) offered as presets (default: accel-tune/ and docs/tune/ "
                           "under the current folder)")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="versions and available methods")
    info.set_defaults(func=_info)
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the run's profile (QUICK, FULL, or TIMM for a timm model)."""
    profile = FULL if args.full else QUICK
    if getattr(args, "llm", False) and args.repeats is None:
        args.repeats = 3  # a round decodes 3 x 4 x 64 tokens
    if args.model not in (DEFAULT_MODEL, BUILT_IN_VIT) + BUILT_IN_DIFFUSION:
        profile = {**QUICK, **TIMM}
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _check(args: argparse.Namespace, timm_model: bool) -> Optional[str]:
    """What is wrong with the options, in words, or None."""
    minimum = dict(batch=1, repeats=1, eval_images=1, steps=1, per_class=1, fid_real=0, diffusion_repeats=1)
    for option, low in minimum.items():
        if getattr(args, option) < low:
            return f"--{option.replace('_', '-')} must be >= {low}; got {getattr(args, option)}"
    if args.llm:
        return None if args.model == DEFAULT_MODEL and not args.full else "--llm runs the built-in language models; " \
            "drop --model and --full"
    if timm_model:
        import timm

        if args.full:
            return "--full is for the built-in models; drop --model or --full"
        if not timm.is_model(args.model):
            return (f"--model: {args.model!r} is neither built in ({', '.join((BUILT_IN_VIT,) + BUILT_IN_DIFFUSION)}) "
                    f"nor a timm model name (see timm.list_models())")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "bench":
        _resolve(args)
        problem = _check(args, args.model not in (DEFAULT_MODEL, BUILT_IN_VIT) + BUILT_IN_DIFFUSION)
        if problem:
            print(f"accel bench: {problem}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
