"""The rows of an ``accel eval`` record: each setting's speed (over the processes' readings) and quality.

A metric that cannot be computed is None in its row, and the report's notes say why; it is never
a number made up from a missing network.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Dict, List, Optional, Sequence

import torch

from .bench import accuracy, logit_cosine, top1_agreement
from .progress import progress_bar
from .spec import UNPATCHED, Setting

__all__ = ["generator_rows", "classifier_rows", "speed"]


def speed(label: str, readings: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Median over the processes of the seconds per image and the speedup of ``label``."""
    if not readings:
        return {"s_per_image": None, "speedup": None}
    return {"s_per_image": statistics.median(r["s_per_image"][label] for r in readings),
            "speedup": statistics.median(r["speedup"][label] for r in readings)}


def _mean(values: torch.Tensor) -> float:
    return values.double().mean().item()


def generator_rows(settings: Sequence[Setting], images: Dict[str, torch.Tensor], readings: Sequence[Dict[str, Any]],
                   prompts: Sequence[str], judges: Any, progress: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per setting; ``images``: ``{label: uint8 [N, ...]}``, the unpatched images under
    ``"unpatched"``; ``judges``: an ``evaluate.Judges``."""
    from .quality import fid_interval, psnr_per_image, ssim_per_image

    reference = images[UNPATCHED]
    features: Dict[str, torch.Tensor] = {}
    reference_features = None
    if judges.features is not None:
        from .fid import inception_features

        label = f"{progress}: FID features" if progress else None
        with progress_bar(label, total=len(images), unit="setting") as bar:
            for name, out in images.items():
                features[name] = inception_features(out, features=judges.features)
                bar.update()
        if judges.reference is not None and judges.reference_features is None:
            judges.reference_features = inception_features(
                judges.reference, features=judges.features,
                progress=f"{progress}: FID features of {len(judges.reference)} reference images" if progress else None)
        reference_features = judges.reference_features

    def interval(a: torch.Tensor, b: torch.Tensor) -> Dict[str, Any]:
        return dataclasses.asdict(fid_interval(a, b, resamples=judges.fid_resamples))

    rows = []
    with progress_bar(f"{progress}: scoring" if progress else None, total=len(settings), unit="setting") as bar:
        for setting in settings:
            out, baseline = images[setting.label], setting.label == UNPATCHED
            row: Dict[str, Any] = {"settings": setting.label, "method": setting.names, **setting.as_record(),
                                   **speed(setting.label, readings)}
            row["psnr"] = None if baseline else _mean(psnr_per_image(out, reference))
            row["ssim"] = None if baseline else _mean(ssim_per_image(out, reference))
            row["clip_score"] = None if judges.clip is None else judges.clip.score(out, list(prompts))
            row["fid_vs_unpatched"] = None if baseline or not features else interval(
                features[setting.label], features[UNPATCHED])
            row["fid_vs_reference"] = None if reference_features is None else interval(
                features[setting.label], reference_features)
            row["class_accuracy"] = None
            if judges.classifier is not None and judges.labels is not None:
                with torch.inference_mode():
                    row["class_accuracy"] = accuracy(judges.classifier(out), judges.labels)
            rows.append(row)
            bar.update()
    return rows


def classifier_rows(settings: Sequence[Setting], logits: Dict[str, torch.Tensor], readings: Sequence[Dict[str, Any]],
                    labels: Optional[torch.Tensor]) -> List[Dict[str, Any]]:
    """One row per setting; ``logits``: ``{label: [N, K]}``. ``accuracy_drop`` is in points (%)."""
    reference = logits[UNPATCHED]
    base = None if labels is None else accuracy(reference, labels)
    rows = []
    for setting in settings:
        out = logits[setting.label]
        acc = None if labels is None else accuracy(out, labels)
        rows.append({"settings": setting.label, "method": setting.names, **setting.as_record(),
                     **speed(setting.label, readings), "top1_agreement": top1_agreement(out, reference),
                     "logit_cosine": logit_cosine(out, reference), "baseline_accuracy": base, "accuracy": acc,
                     "accuracy_drop": None if acc is None else 100 * (base - acc)})
    return rows
