"""Speed and quality of patched diffusion pipelines against the unpatched one, side by side.

Speed: seconds per image of the same generation call (one image of every class), baseline and
variants interleaved, medians. Quality on a fixed set (``per_class`` images of every class, the
same seeds for every variant): PSNR of each image against the unpatched pipeline's image, FID
against real test images, CLIP score against the prompts, and the fraction a classifier labels
as the requested class.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .bench import accuracy
from .progress import duration, progress_bar
from .timing import cpu_per_wall, time_interleaved

__all__ = ["psnr", "DiffusionRow", "DIFFUSION_COLUMNS", "bench_diffusion", "image_grid"]


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB, peak 255) of uint8 ``images`` against ``reference``
    (same shape ``[N, ...]``); identical images count as 100 dB so the mean stays finite."""
    diff = images.float().flatten(1) - reference.float().flatten(1)
    mse = diff.pow(2).mean(dim=1)
    values = torch.where(mse == 0, torch.full_like(mse, 100.0), 10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10)))
    return values.mean().item()


@dataclass
class DiffusionRow:
    model: str
    method: str
    settings: str
    steps: int
    s_per_image: float
    speedup: float
    psnr: Optional[float]
    fid: Optional[float]
    clip_score: Optional[float]
    class_accuracy: Optional[float]
    cpu_per_wall: Optional[float] = None  # of the whole interleaved timing (``timing.cpu_per_wall``)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


DIFFUSION_COLUMNS = [
    ("model", "model", ""),
    ("method", "method", ""),
    ("settings", "settings", ""),
    ("steps", "steps", ""),
    ("s_per_image", "s/image", ".3f"),
    ("speedup", "speedup", ".2f"),
    ("psnr", "PSNR vs unpatched (dB)", ".1f"),
    ("fid", "FID", ".1f"),
    ("clip_score", "CLIP score", ".2f"),
    ("class_accuracy", "class accuracy", ".3f"),
]


def bench_diffusion(
    pipe: Any,
    variants: Dict[str, Dict[str, Any]],
    *,
    model_name: str,
    generate: Callable[[Any, torch.Tensor, int], torch.Tensor],
    num_classes: int,
    steps: int,
    per_class: int,
    repeats: int = 3,
    fid_reference: Any = None,
    prompts: Optional[Callable[[int], str]] = None,
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    clip_scorer: Any = None,
    progress: Optional[str] = None,
    log: Optional[Callable[[str], Any]] = None,
) -> tuple:
    """Rows for the unpatched pipeline and each variant ``{label: accel.patch keywords}``, and
    the images of each (``{label: uint8 [per_class * num_classes, H, W]}``).

    ``generate(pipe, labels, steps)`` returns uint8 images of the classes ``labels`` with fixed seeds;
    ``fid_reference`` is an ``accel.eval.fid.FidReference`` of real images. Quality columns are
    skipped (None) when their model is not given. ``progress``: a label for progress bars on stderr;
    ``log`` (e.g. ``print``) is told what the quality pass will cost, from the measured speed.
    """
    from .. import patch

    pipes = {"unpatched": pipe}
    for label, methods in variants.items():
        pipes[label] = patch(copy.deepcopy(pipe), **methods)
    one_each = torch.arange(num_classes)
    calls = {label: (lambda p=p: generate(p, one_each, steps)) for label, p in pipes.items()}
    timings = time_interleaved(calls, repeats=repeats, warmup=1, items_per_call=num_classes,
                               progress=f"{progress}: timing" if progress else None)

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    if log is not None:
        seconds = len(labels) * sum(t.median_s for t in timings.values()) / num_classes
        log(f"quality: {len(labels)} images with each of {len(pipes)} settings, about {duration(seconds)}"
            + (" and the FID features" if fid_reference is not None else ""))
    images = {}
    with progress_bar(f"{progress}: generating" if progress else None, total=len(pipes) * len(labels),
                      unit="image") as bar:
        for label, p in pipes.items():
            images[label] = generate(p, labels, steps)
            bar.update(len(labels))
    reference = images["unpatched"]
    used = cpu_per_wall(timings)
    rows = []
    with progress_bar(f"{progress}: scoring" if progress else None, total=len(pipes), unit="setting") as bar:
        for label in pipes:
            out = images[label]
            method = "-" if label == "unpatched" else "+".join(variants[label])
            rows.append(DiffusionRow(
                model=model_name, method=method, settings=label, steps=steps,
                s_per_image=timings[label].median_s / num_classes,
                speedup=timings[label].speedup_over(timings["unpatched"]),
                psnr=None if label == "unpatched" else psnr(out, reference),
                fid=None if fid_reference is None else fid_reference.fid(out),
                clip_score=None if clip_scorer is None or prompts is None
                else clip_scorer.score(out, [prompts(int(c)) for c in labels]),
                class_accuracy=None if classifier is None else accuracy(classifier(out), labels),
                cpu_per_wall=used,
            ))
            bar.update()
    return rows, images


def image_grid(images: Dict[str, torch.Tensor], path: Path, columns: Sequence[int], scale: int = 2) -> Path:
    """A PNG with one row per variant (in order) of the images at indices ``columns``; uint8 ``[N, H, W]``."""
    from PIL import Image

    rows = [torch.cat([images[label][i] for i in columns], dim=1) for label in images]
    grid = torch.cat(rows, dim=0)
    picture = Image.fromarray(grid.numpy(), mode="L")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
