"""The files of an ``accel eval`` report: the JSON record, a Markdown table, PNG plots drawn from the
JSON (speedup against each quality metric, the Pareto front marked) and a labelled image grid."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .report import format_table

__all__ = ["write_report", "plot_record", "table", "grid_scale", "GENERATOR_COLUMNS", "CLASSIFIER_COLUMNS", "PLOTS"]

GENERATOR_COLUMNS = [
    ("settings", "settings", ""), ("s_per_image", "s/image", ".3f"), ("speedup", "speedup", ".2f"),
    ("psnr", "PSNR vs unpatched (dB)", ".1f"), ("ssim", "SSIM vs unpatched", ".3f"),
    ("clip_score", "CLIP score", ".2f"), ("fid_vs_unpatched_text", "FID vs unpatched [95% CI]", ""),
    ("fid_vs_reference_text", "FID vs reference [95% CI]", ""), ("class_accuracy", "class accuracy", ".3f"),
]
CLASSIFIER_COLUMNS = [
    ("settings", "settings", ""), ("s_per_image", "s/image", ".5f"), ("speedup", "speedup", ".2f"),
    ("accuracy", "top-1 accuracy", ".4f"), ("accuracy_drop", "drop (points)", ".2f"),
    ("top1_agreement", "top-1 agreement", ".3f"), ("logit_cosine", "logit cosine", ".4f"),
]
# (key, axis label, higher is better, interval keys): one plot per metric the record has.
PLOTS: List[Tuple[str, str, bool, Optional[Tuple[str, str]]]] = [
    ("psnr", "PSNR vs unpatched (dB)", True, None),
    ("ssim", "SSIM vs unpatched", True, None),
    ("clip_score", "CLIP score", True, None),
    ("fid_vs_unpatched_value", "FID vs unpatched", False, ("fid_vs_unpatched_low", "fid_vs_unpatched_high")),
    ("fid_vs_reference_value", "FID vs reference", False, ("fid_vs_reference_low", "fid_vs_reference_high")),
    ("class_accuracy", "class accuracy", True, None),
    ("accuracy", "top-1 accuracy", True, None),
    ("top1_agreement", "top-1 agreement with unpatched", True, None),
]


def _flat(row: Dict[str, Any]) -> Dict[str, Any]:
    """A row with its FID intervals as ``fid_*_value/low/high`` and ``fid_*_text`` for tables."""
    out = dict(row)
    for key in ("fid_vs_unpatched", "fid_vs_reference"):
        estimate = row.get(key)
        if isinstance(estimate, dict):
            out.update({f"{key}_value": estimate["value"], f"{key}_low": estimate["low"],
                        f"{key}_high": estimate["high"],
                        f"{key}_text": f"{estimate['value']:.2f} [{estimate['low']:.2f}, {estimate['high']:.2f}]"})
    return out


def table(record: Dict[str, Any], style: str = "markdown") -> str:
    """The record's rows as a table; columns no row has a value for are left out."""
    rows = [_flat(r) for r in record["rows"]]
    columns = GENERATOR_COLUMNS if record["meta"]["kind"] == "generator" else CLASSIFIER_COLUMNS
    return format_table(rows, columns, style=style, drop_empty=True)


def plot_record(record: Dict[str, Any], folder: Path) -> List[Path]:
    """``speedup-vs-<metric>.png`` for every quality metric the record has a value for; a tune
    record (``meta["tune"]``) also gets its budget line and its choice marked."""
    from .plot import tradeoff_plot

    rows = [_flat(r) for r in record["rows"]]
    paths = []
    tune = record["meta"].get("tune") or {}
    plots = PLOTS + ([(tune["metric"], "top-1 accuracy drop (points)", False, None)]
                     if tune.get("metric") == "accuracy_drop" else [])
    for key, label, higher, interval in plots:
        if not any(r.get(key) is not None for r in rows):
            continue
        marks = dict(budget=tune.get("bound"), chosen=tune.get("chosen")) if tune.get("metric") == key else {}
        paths.append(tradeoff_plot(rows, Path(folder) / f"speedup-vs-{key.replace('_value', '')}.png", y=key,
                                   ylabel=label, title=f"{record['meta']['model']}: speedup against {label}",
                                   higher_is_better=higher, interval=interval, **marks))
    return paths


def _describe(record: Dict[str, Any]) -> str:
    meta = record["meta"]
    lines = [f"Model: {meta['model']} ({meta['kind']}), {meta['count']} "
             f"{'prompts' if meta['kind'] == 'generator' else 'images'}, batch {meta['batch']}, "
             f"{meta['world']} process(es) on {meta['device']}, {meta['threads']} threads each."]
    if meta["kind"] == "generator":
        lines.append(f"{meta['steps']} steps, guidance {meta['guidance']}; {meta['seeds']}.")
        judges = meta["judges"]
        lines.append(f"CLIP score: {judges['clip'] or 'not computed'}; FID features: "
                     f"{judges['fid_features'] or 'not computed'}; reference set: {judges['reference'] or 'none'}; "
                     f"classifier: {judges['classifier'] or 'none'}.")
        lines += [f"Note: {note}" for note in judges["notes"]]
    for reading in meta["timing"]:
        cpu = reading["cpu_per_wall"]
        lines.append(f"Timing on rank {reading['rank']}: batch {reading['batch']}, {meta['repeats']} interleaved "
                     f"rounds, medians; CPU use {'-' if cpu is None else f'{cpu:.2f}'} of {reading['threads']} "
                     f"threads; load average {reading['load_average']:.2f}.")
    return "\n".join(lines)


def grid_scale(width: int, cell: int = 140) -> int:
    """The integer upscaling that makes an image ``width`` pixels wide at least ``cell`` wide (a
    28-pixel image: 5), so that a setting's label fits above its column; 1 for large images."""
    return max(1, -(-cell // width))


def write_report(record: Dict[str, Any], folder: Path, *, grid_rows: int = 8, save_images: bool = False
                 ) -> Dict[str, Path]:
    """Write ``report.json`` (the record without the images), ``report.md``, the plots (drawn from
    the JSON as written) and, for generators, ``grid.png`` (rows: the first ``grid_rows`` prompts,
    columns: settings) and with ``save_images`` ``images.pt`` (``{label: uint8 [N, ...]}``, for
    ``torch.load``). Returns {kind: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in record.items() if k != "images"}
    paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
    paths["json"].write_text(json.dumps(saved, indent=2) + "\n")
    saved = json.loads(paths["json"].read_text())  # the plots come from the record as stored
    paths["markdown"].write_text(f"{_describe(saved)}\n\n{table(saved)}\n")
    for path in plot_record(saved, folder):
        paths[path.stem] = path
    images = record.get("images")
    if images:
        from .grid import labelled_grid

        n = min(grid_rows, len(saved["per_image"]))
        labels = [f"{p['prompt']} (seed {p['seed']})" for p in saved["per_image"][:n]]
        paths["grid"] = labelled_grid({label: out[:n] for label, out in images.items()}, folder / "grid.png",
                                      row_labels=labels, scale=grid_scale(next(iter(images.values())).shape[-1]))
        if save_images:
            import torch

            paths["images"] = folder / "images.pt"
            torch.save(images, paths["images"])
    return paths
