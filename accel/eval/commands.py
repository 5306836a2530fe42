"""``accel eval`` and ``accel tune``: their options and what they run (``accel.cli`` dispatches here)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

__all__ = ["add_eval_parser", "add_tune_parser"]

HELD_OUT_SEED = 1_000_000  # tune's held-out images: the same prompts drawn with seeds this far away
EPILOG = """Data parallel: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m accel.cli eval ...
on CPUs (plain --cpu starts one process), accelerate launch --multi_gpu --num_processes 8 -m accel.cli eval ... on
8 GPUs; see accel/eval/shard.py for several machines. Images equal a one-process run's with the same --batch and
--threads."""


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 384}}'; got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="fashion-sd, fashion-dit or fashion-vit (built in), a diffusers folder, a cached hub "
                             "id, or a timm model name with --images (and --checkpoint)")
    data = parser.add_argument_group("data")
    data.add_argument("--prompts", help="a text file, one prompt per line (default for built-in pipelines: the "
                                        "class prompts, --per-class of each)")
    data.add_argument("--per-class", type=int, default=2, help="built-in class prompts per class (default 2)")
    data.add_argument("--images", help="classifiers: an ImageFolder (one sub-folder per class)")
    data.add_argument("--checkpoint", help="classifiers: timm weights (.pth or .safetensors); the model gets as "
                                           "many classes as --images has sub-folders")
    data.add_argument("--model-kwargs", type=_json_object, default=None,
                      help='classifiers: JSON keywords for timm.create_model, e.g. \'{"img_size": 384}\'')
    data.add_argument("--limit", type=int, help="classifiers: the first N images only")
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    run.add_argument("--guidance", type=float, help="guidance scale (default: 3 built in, else the pipeline's)")
    run.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed SEED + i (default 0)")
    run.add_argument("--batch", type=int, default=8, help="prompts or images per call; the unit shared "
                                                          "out among processes (default 8)")
    run.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    run.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    judges = parser.add_argument_group("quality")
    judges.add_argument("--clip-model", help="a local CLIP folder or cached hub id (default fashion-clip)")
    judges.add_argument("--reference", help="a folder of reference images for FID (fashion-mnist: the test subset)")
    judges.add_argument("--reference-limit", type=int, default=500,
                        help="reference images used (default 500; Inception runs ~7 images/s on 2 CPU cores)")
    judges.add_argument("--no-fid", action="store_true", help="skip FID (its Inception pass is the slowest part)")
    judges.add_argument("--fid-resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    parser.add_argument("--report", help="also write the table into this Markdown file's accel_<command>_<model> "
                                         "section, with the command and the machine (e.g. docs/benchmarks.md)")


def add_eval_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "eval", help="speed and quality of settings against the unpatched model: JSON, Markdown, plots, grid",
        description="Speed (interleaved with the unpatched model, medians, per process) and quality of each "
                    "setting: PSNR, SSIM, CLIP score and FID with a bootstrap interval for pipelines; accuracy and "
                    "agreement for classifiers. Writes report.json, report.md, speedup-vs-*.png and grid.png.",
        epilog=EPILOG)
    _common(parser)
    parser.add_argument("--methods", nargs="+", required=True, metavar="SETTING",
                        help='shorthand ("tome=0.5" "deepcache=3" "tome=0.5,deepcache=3") or JSON '
                             '(\'{"tome": {"mode": "downsample"}}\'); the unpatched model is always included')
    parser.add_argument("--out", default="accel-eval", help="report folder (default accel-eval/)")
    parser.add_argument("--grid-rows", type=int, default=8, help="prompts shown in grid.png (default 8)")
    parser.add_argument("--save-images", action="store_true", help="also write every image to images.pt")
    parser.set_defaults(func=run_eval)


def add_tune_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "tune", help="the fastest setting within a quality budget, with the Pareto front",
        description="Measure every applicable method and pair of methods on a calibration set (cached, so a rerun "
                    "is instant), choose the fastest setting within the budget, and measure it again on held-out "
                    "data (pipelines: the same prompts with other seeds; classifiers: the next --held-out images).",
        epilog=EPILOG)
    _common(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--min-psnr", type=float, help="PSNR against the unpatched images, dB (e.g. 30)")
    budget.add_argument("--min-ssim", type=float, help="SSIM against the unpatched images (e.g. 0.9)")
    budget.add_argument("--min-clip-score", type=float, help="mean CLIP score")
    budget.add_argument("--max-accuracy-drop", type=float, help="classifiers: top-1 drop in points (e.g. 0.5)")
    parser.add_argument("--methods", nargs="+", help="tune only these methods (default: all that apply)")
    parser.add_argument("--no-compose", action="store_true", help="single methods only, no pairs")
    parser.add_argument("--held-out", type=int, default=500, help="classifiers: held-out images (default 500)")
    parser.add_argument("--cache", help="measurement cache (default ~/.cache/accel/tune.json)")
    parser.add_argument("--out", default="accel-tune", help="report folder (default accel-tune/)")
    parser.set_defaults(func=run_tune)


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"accel {command}: {message}", file=sys.stderr)
    return code


def _prepare(args: argparse.Namespace, command: str):
    """(shard, subject, judges) for the options, or raise ValueError."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .inputs import load_subject, make_judges
    from .shard import Shard

    diffusers_logging.disable_progress_bar()  # loading bars would interleave with ours
    transformers_logging.disable_progress_bar()

    for option in ("batch", "repeats", "steps", "per_class", "reference_limit", "fid_resamples"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1; got {getattr(args, option)}")
    shard = Shard.from_accelerate(threads=args.threads)
    limit = args.limit
    if command == "tune" and limit is not None:
        limit += args.held_out
    subject = load_subject(args.model, prompts=args.prompts, per_class=args.per_class, images=args.images,
                           checkpoint=args.checkpoint, limit=limit, model_kwargs=args.model_kwargs)
    judges = make_judges(clip_model=args.clip_model, reference=args.reference, reference_limit=args.reference_limit,
                         fid=not args.no_fid, resamples=args.fid_resamples,
                         labels=subject.labels if subject.built_in else None) if subject.kind == "generator" else None
    return shard, subject, judges


def _evaluate(args: argparse.Namespace, shard: Any, subject: Any, judges: Any, settings: List[Any],
              seed: int, images: Any = None, labels: Any = None) -> Any:
    from .evaluation import evaluate

    options: Dict[str, Any] = dict(batch=args.batch, repeats=args.repeats, shard=shard, name=subject.name,
                                   progress=subject.name)
    if subject.kind == "generator":
        return evaluate(subject.model, settings, prompts=subject.prompts, seed=seed, steps=args.steps,
                        guidance=args.guidance if args.guidance is not None else subject.guidance, judges=judges,
                        postprocess=subject.postprocess, **options)
    return evaluate(subject.model, settings, images=images, labels=labels, **options)


def run_eval(args: argparse.Namespace) -> int:
    from .outputs import table, write_report
    from .spec import parse_settings

    try:
        settings = parse_settings(args.methods)
        shard, subject, judges = _prepare(args, "eval")
    except (ValueError, TypeError) as error:
        return _fail("eval", str(error))
    try:
        record = _evaluate(args, shard, subject, judges, settings, args.seed, subject.images, subject.labels)
    finally:
        shard.close()
    if not shard.is_main:
        return 0  # the main process writes the report
    paths = write_report(record, Path(args.out), grid_rows=args.grid_rows, save_images=args.save_images)
    print(table(record, style="text"))
    print("\n".join(f"wrote {path}" for path in paths.values()))
    _section(args, "eval", paths["markdown"].read_text())
    return 0


def _section(args: argparse.Namespace, command: str, text: str) -> None:
    """With ``--report``: ``text`` into that file's section for this command and model, after the
    date, the machine, the load average now and the command that reproduces it."""
    if not args.report:
        return
    import datetime
    import os
    import shlex

    from .report import machine_description, replace_section

    argv = [a for a in args.argv if not a.startswith("--report") and a != args.report]
    name = f"accel_{command}_{Path(args.model).name}".replace("-", "_")
    replace_section(Path(args.report), name, (
        f"Measured {datetime.date.today().isoformat()} on {machine_description('diffusers', 'timm')}; load average "
        f"{os.getloadavg()[0]:.2f} at the end. Command: `accel {shlex.join(argv)}`\n\n{text}"))
    print(f"wrote the table to {args.report} (section {name})")


def run_tune(args: argparse.Namespace) -> int:
    from .outputs import table, write_report
    from .progress import say
    from .tuning import Budget, NoSettingMeetsBudget, candidates, tune

    option = next(o for o in ("min_psnr", "min_ssim", "min_clip_score", "max_accuracy_drop")
                  if getattr(args, o) is not None)
    metric, bound = option[4:], getattr(args, option)
    try:
        budget = Budget(metric, bound)
        shard, subject, judges = _prepare(args, "tune")
        if (metric == "accuracy_drop") != (subject.kind == "classifier"):
            raise ValueError(f"--{option.replace('_', '-')} does not apply to a {subject.kind}")
        settings = candidates(subject.model, args.methods, compose=not args.no_compose)
    except (ValueError, TypeError) as error:
        return _fail("tune", str(error))
    n = len(subject.images) - args.held_out if subject.kind == "classifier" else len(subject.prompts)
    if n < 1:
        return _fail("tune", f"--held-out {args.held_out} leaves no calibration images of {len(subject.images)}")
    reports: Dict[str, Any] = {}

    def measure(chosen: List[Any], part: str) -> List[Dict[str, Any]]:
        if subject.kind == "generator":
            seed = args.seed + (HELD_OUT_SEED if part == "held-out" else 0)
            record = _evaluate(args, shard, subject, judges, chosen, seed)
        else:
            cut = slice(n, None) if part == "held-out" else slice(0, n)
            record = _evaluate(args, shard, subject, judges, chosen, args.seed, subject.images[cut],
                               subject.labels[cut])
        reports[part] = record
        return record["rows"]

    context = {"model": args.model, "checkpoint": args.checkpoint, "model_kwargs": args.model_kwargs,
               "images": args.images, "prompts": subject.prompts, "seed": args.seed,
               "steps": args.steps, "guidance": args.guidance, "batch": args.batch, "calibration": n,
               "clip": args.clip_model, "world": shard.world, "threads": args.threads}
    try:
        result = tune(subject.model, budget, measure, context=_machine(context), settings=settings,
                      cache=Path(args.cache) if args.cache else None, log=say if shard.is_main else (lambda _: 0),
                      write=shard.is_main)
    except NoSettingMeetsBudget as error:
        return _fail("tune", str(error), code=1)
    finally:
        shard.close()
    if not shard.is_main:
        return 0
    out = Path(args.out)
    measured = reports.get("calibration") or reports.get("held-out")
    meta = measured["meta"] if measured else _cached_meta(args, subject, shard, judges, n)
    record = {"meta": {**meta, "tune": {"budget": result["budget"], "metric": metric, "bound": bound,
                                         "chosen": result["label"]}},
              "rows": result["rows"], "per_image": []}
    write_report(record, out)
    (out / "tune.json").write_text(json.dumps({"model": args.model, **{k: v for k, v in result.items() if k != "rows"}},
                                              indent=2) + "\n")
    held = result["held_out"]
    lines = [f"fastest within {result['budget']}: {result['label']} ({result['chosen']['speedup']:.2f}x, "
             f"{metric} {result['chosen'][metric]:.3g} on the calibration set)",
             f"held out: {held['speedup']:.2f}x, {metric} {held[metric]:.3g}: "
             f"{'within' if result['held_out_within_budget'] else 'OUTSIDE'} the budget",
             f"Pareto front: {', '.join(result['front'])}",
             f"apply it: accel.patch(model, **{result['settings']!r})"]
    print("\n".join(lines + [f"wrote {out}/tune.json, report.md and plots"]))
    _section(args, "tune", "\n".join(f"- {line}" for line in lines) + f"\n\n{table(record)}\n")
    return 0


def _cached_meta(args: argparse.Namespace, subject: Any, shard: Any, judges: Any, count: int) -> Dict[str, Any]:
    """A report's description when every row came from the cache (its timing lines are in the
    report of the run that measured them)."""
    import torch

    from .evaluation import judge_names

    meta = {"model": subject.name, "kind": subject.kind, "count": count, "batch": args.batch, "world": shard.world,
            "device": str(shard.device), "threads": torch.get_num_threads(), "repeats": args.repeats, "timing": []}
    if subject.kind == "generator":
        guidance = args.guidance if args.guidance is not None else subject.guidance
        meta.update(steps=args.steps, guidance=guidance, seeds=f"prompt i drawn with seed {args.seed} + i",
                    judges=judge_names(judges))
    return meta


def _machine(context: Dict[str, Any]) -> Dict[str, Any]:
    """Measurements from another machine or library version are not reused."""
    from .. import __version__
    from .report import machine_description

    return {**context, "machine": machine_description("diffusers", "timm"), "accel": __version__}
