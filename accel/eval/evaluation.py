"""``accel eval``: each setting's speed and quality against the unpatched model, as one JSON-able record.

    record = evaluate(pipe, ["tome=0.5", "deepcache=3"], prompts=["a photo of a bag", ...])
    record = evaluate(vit, ["tome=4"], images=x, labels=y)          # x: [N, C, H, W] preprocessed

Speed: seconds per image of one batch, the unpatched model and every setting interleaved, medians
(``timing.time_interleaved``), measured by every process on its own first batch and reported per
process. Quality, on every image, computed once on the main process after the images are gathered:
generators get PSNR and SSIM against the unpatched image of the same seed, the CLIP score against
the prompt, FID against the unpatched outputs (and a reference set) with a bootstrap interval, and,
given the class of each prompt, a classifier's accuracy; classifiers get top-1 accuracy and agreement.
Prompt ``i`` is drawn with seed ``seed + i`` whatever batch it falls in.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .progress import progress_bar
from .shard import Shard, batches
from .spec import UNPATCHED, Setting, parse_settings
from .timing import Timing, cpu_per_wall, time_interleaved

__all__ = ["evaluate", "Judges", "judge_names", "light_copy", "generate_batch", "to_uint8", "Timer"]

Timer = Callable[[Dict[str, Callable[[], Any]]], Dict[str, Timing]]


@dataclass
class Judges:
    """What scores generated images, each named in the report. ``clip``: a ``ClipScorer``;
    ``features``: ``fid.InceptionFeatures``; ``reference``: uint8 images for FID against a reference
    set; ``classifier``: uint8 images -> logits, with ``labels`` (a class per prompt). A judge that
    is None is absent, and ``notes`` say why."""

    clip: Any = None
    clip_name: Optional[str] = None
    features: Any = None
    features_name: Optional[str] = None
    reference: Optional[torch.Tensor] = None
    reference_name: Optional[str] = None
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    classifier_name: Optional[str] = None
    labels: Optional[torch.Tensor] = None
    notes: List[str] = field(default_factory=list)
    fid_resamples: int = 200
    reference_features: Optional[torch.Tensor] = None  # computed once, on first use, for every pipeline judged


def light_copy(obj: Any) -> Any:
    """A deep copy of ``obj`` (a module or a pipeline) that shares its parameters and buffers:
    patches change how a model computes, never its weights (DESIGN.md §3), so one copy per setting
    costs module objects, not a second set of weights (SD 1.5 is 4 GB)."""
    modules = [obj] if isinstance(obj, torch.nn.Module) else [v for v in vars(obj).values()
                                                              if isinstance(v, torch.nn.Module)]
    memo: Dict[int, Any] = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            memo[id(tensor)] = tensor
    return copy.deepcopy(obj, memo)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """A pipeline's ``output_type="pt"`` images ``[B, C, H, W]`` in [0, 1] -> uint8."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.inference_mode()
def generate_batch(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                   guidance: Optional[float] = None, postprocess: Callable[[torch.Tensor], torch.Tensor] = to_uint8,
                   ) -> torch.Tensor:
    """uint8 images of ``prompts``, prompt ``i`` drawn with its own generator seeded ``seeds[i]``
    (so an image does not depend on its neighbours' seeds). A class-conditional pipeline (DiT) takes
    class names as prompts (``pipe.get_label_ids``)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    options: Dict[str, Any] = dict(num_inference_steps=steps, generator=generators, output_type="pt")
    if guidance is not None:
        options["guidance_scale"] = guidance
    if hasattr(pipe, "get_label_ids"):
        out = pipe(class_labels=pipe.get_label_ids(list(prompts)), **options)
    else:
        out = pipe(prompt=list(prompts), **options)
    return postprocess(out.images)


def _models(model: Any, settings: Sequence[Setting], move: Callable[[Any], Any]) -> Dict[str, Any]:
    from .. import patch

    models = {}
    for setting in settings:
        base = setting.model if setting.model is not None else model
        models[setting.label] = move(base) if not setting.methods else patch(light_copy(move(base)),
                                                                             **setting.methods)
    return models


def _timing(timings: Dict[str, Timing], rank: int, items: int) -> Dict[str, Any]:
    """One process's reading: seconds per image and speedup of every setting, its CPU use."""
    base = timings[UNPATCHED]
    return {"rank": rank, "batch": items, "cpu_per_wall": cpu_per_wall(timings),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
            "s_per_image": {k: t.median_s / items for k, t in timings.items()},
            "speedup": {k: t.speedup_over(base) for k, t in timings.items()}}


def _default_timer(repeats: int, warmup: int, label: Optional[str], sync: Optional[Callable[[], Any]],
                   log: Optional[Callable[[str], Any]]) -> Timer:
    return lambda calls: time_interleaved(calls, repeats=repeats, warmup=warmup, sync=sync, progress=label, log=log)


def evaluate(model: Any, settings: Sequence[Any], *, prompts: Optional[Sequence[str]] = None,
             images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, seed: int = 0,
             steps: int = 20, guidance: Optional[float] = None, batch: int = 8, repeats: int = 3, warmup: int = 1,
             judges: Optional[Judges] = None, postprocess: Callable[[torch.Tensor], torch.Tensor] = to_uint8,
             shard: Optional[Shard] = None, timer: Optional[Timer] = None, progress: Optional[str] = None,
             log: Optional[Callable[[str], Any]] = None, name: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``settings`` (shorthand, JSON, dicts or ``Setting``s; the unpatched baseline is added)
    on a diffusers pipeline with ``prompts``, or on a classifier with ``images`` ``[N, C, H, W]``
    (preprocessed) and optional ``labels [N]``. Returns the record ``{"meta", "rows", "per_image",
    "images"}``, scored once on the main process and shared with the others; the generated images,
    ``{label: uint8 [N, ...]}``, only on the main process (None elsewhere; ``outputs.write_report``
    writes them).
    ``timer``: replaces the interleaved timing (``{label: call} -> {label: Timing}``), for tests.
    ``progress``: a label for progress bars on stderr; ``log`` (e.g. ``print``) is told how long the
    timing will take."""
    from ..families import is_diffusers_pipeline

    shard = shard or Shard()
    settings = parse_settings(settings)
    generator = is_diffusers_pipeline(model)
    if generator == (prompts is None) or (images is not None) == generator:
        raise ValueError("evaluate: a diffusers pipeline takes prompts=, a classifier images= (and labels=)")
    count = len(prompts) if generator else len(images)
    if count == 0:
        raise ValueError(f"evaluate: {'prompts' if generator else 'images'} is empty")
    if labels is not None and len(labels) != count:
        raise ValueError(f"evaluate: labels has {len(labels)} entries for {count} inputs")
    device = shard.device
    models = _models(model, settings, lambda m: m.to(device))
    work = batches(count, batch)
    mine = shard.mine(work)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    timer = timer or _default_timer(repeats, warmup, f"{progress}: timing" if progress else None, sync, log)

    if generator:
        def run(label: str, index: range) -> torch.Tensor:
            return generate_batch(models[label], [prompts[i] for i in index], [seed + i for i in index],
                                  steps=steps, guidance=guidance, postprocess=postprocess)
    else:
        def run(label: str, index: range) -> torch.Tensor:
            with torch.inference_mode():
                return models[label](images[index.start:index.stop].to(device)).float().cpu()

    reading = None
    if mine:
        first = work[mine[0]]
        timings = timer({label: (lambda label=label: run(label, first)) for label in models})
        reading = _timing(timings, shard.rank, len(first))
    outputs: Dict[int, Dict[str, torch.Tensor]] = {}
    with progress_bar(f"{progress}: {'generating' if generator else 'classifying'}" if progress else None,
                      total=len(mine) * len(models), unit="batch") as bar:
        for label in models:
            for i in mine:
                outputs.setdefault(i, {})[label] = run(label, work[i])
                bar.update()
    gathered = shard.gather({"rank": shard.rank, "timing": reading, "outputs": outputs})
    if not shard.is_main:  # the main process scores; the others get its rows (``tune`` goes on everywhere)
        record = next(r for r in shard.gather(None) if r is not None)
        return {**record, "images": None}
    record = _score(settings, gathered, work, count, generator, prompts, labels, seed, judges, progress)
    record["meta"].update(model=name or type(model).__name__, batch=batch, world=shard.world, device=str(device),
                          threads=torch.get_num_threads(), repeats=repeats)
    if generator:
        record["meta"].update(steps=steps, guidance=guidance)
    shard.gather({k: v for k, v in record.items() if k != "images"})
    return record


def _score(settings: Sequence[Setting], gathered: List[Dict[str, Any]], work: List[range], count: int,
           generator: bool, prompts: Optional[Sequence[str]],
           labels: Optional[torch.Tensor], seed: int, judges: Optional[Judges], progress: Optional[str]
           ) -> Dict[str, Any]:
    """The record from every process's outputs: images (or logits) in prompt order, the rank that
    made each, and the rows."""
    ranks = [None] * count
    merged: Dict[str, List[torch.Tensor]] = {s.label: [] for s in settings}
    by_batch = {i: (part["rank"], out) for part in gathered for i, out in part["outputs"].items()}
    for i, index in enumerate(work):
        rank, out = by_batch[i]
        for j in index:
            ranks[j] = rank
        for label, parts in merged.items():
            parts.append(out[label])
    results = {label: torch.cat(parts) for label, parts in merged.items()}
    readings = [part["timing"] for part in gathered if part["timing"] is not None]
    from .scores import classifier_rows, generator_rows

    meta = {"kind": "generator" if generator else "classifier", "count": count, "timing": readings}
    if generator:
        meta["seeds"] = f"prompt i drawn with seed {seed} + i"
        rows = generator_rows(settings, results, readings, [prompts[i] for i in range(count)], judges or Judges(),
                              progress)
        meta["judges"] = judge_names(judges or Judges())
        per_image = [{"index": i, "prompt": prompts[i], "seed": seed + i, "rank": ranks[i]} for i in range(count)]
        return {"meta": meta, "rows": rows, "per_image": per_image, "images": results}
    rows = classifier_rows(settings, results, readings, labels)
    per_image = [{"index": i, "rank": ranks[i]} for i in range(count)]
    return {"meta": meta, "rows": rows, "per_image": per_image, "images": None}


def judge_names(judges: Judges) -> Dict[str, Any]:
    return {"clip": judges.clip_name, "fid_features": judges.features_name, "reference": judges.reference_name,
            "classifier": judges.classifier_name, "notes": list(judges.notes)}
