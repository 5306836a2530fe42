"""Tables for reports: the same rows as Markdown (docs) or aligned text (terminal)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["Column", "BENCH_COLUMNS", "ACCURACY_COLUMNS", "DIFFUSION_COLUMNS", "format_table", "replace_section", "machine_description",
           "run_meta", "add_device_args", "checked_device", "device_section"]

Column = Tuple[str, str, str]  # (key in the row dict, header, format spec)

BENCH_COLUMNS: List[Column] = [
    ("model", "model", ""),
    ("batch", "batch", ""),
    ("method", "method", ""),
    ("settings", "settings", ""),
    ("baseline_items_s", "baseline img/s", ".2f"),
    ("items_s", "patched img/s", ".2f"),
    ("speedup", "speedup", ".2f"),
    ("top1_agreement", "top-1 agreement", ".3f"),
    ("logit_cosine", "logit cosine", ".4f"),
]

# With labels (trained models): accuracy of the unpatched and the patched model.
ACCURACY_COLUMNS: List[Column] = BENCH_COLUMNS + [
    ("baseline_accuracy", "baseline accuracy", ".4f"),
    ("accuracy", "patched accuracy", ".4f"),
]

# `accel bench` on a built-in pipeline: quality against the unpatched images, the real images and the prompts.
DIFFUSION_COLUMNS: List[Column] = [
    ("model", "model", ""),
    ("method", "method", ""),
    ("settings", "settings", ""),
    ("steps", "steps", ""),
    ("s_per_image", "s/image", ".3f"),
    ("speedup", "speedup", ".2f"),
    ("psnr", "PSNR vs unpatched (dB)", ".1f"),
    ("ssim", "SSIM vs unpatched", ".3f"),
    ("fid", "FID", ".1f"),
    ("clip_score", "CLIP score", ".2f"),
    ("class_accuracy", "class accuracy", ".3f"),
]


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column], style: str = "markdown",
                 drop_empty: bool = False) -> str:
    """Render ``rows`` (dicts) with ``columns``; ``style`` is ``markdown`` or ``text``;
    ``drop_empty`` leaves out the columns no row has a value for."""
    if style not in ("markdown", "text"):
        raise ValueError(f"style must be 'markdown' or 'text'; got {style!r}")
    if drop_empty:
        columns = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]
    header = [title for _, title, _ in columns]
    body = [[_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    numeric = [bool(spec) for _, _, spec in columns]  # numbers right-aligned, text left-aligned

    def line(cells: List[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def replace_section(path: Path, name: str, content: str) -> None:
    """Put ``content`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``
    (appending the section if it is not there yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{content.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text.lstrip("\n"))


def machine_description(*packages: str, device: Any = "cpu") -> str:
    """Where figures were measured: ``"x86_64 CPU, 2 threads; torch 2.x, timm 1.x, Python 3.11.7"``,
    or the GPU's name first (``"NVIDIA H100 80GB HBM3 (CUDA 13.0), x86_64 host; ..."``)."""
    import importlib
    import platform

    import torch

    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in ("torch",) + packages)
    device = torch.device(device)
    where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), {platform.machine()} host"
    return f"{where}; {versions}, Python {platform.python_version()}"


def run_meta(command: str, seed: int, *packages: str, device: Any = "cpu",
             dtype: str = "float32") -> Dict[str, Any]:
    """The record a benchmark script keeps beside its rows: date, machine, dtype, weights, command."""
    import datetime

    return {"date": datetime.date.today().isoformat(), "machine": machine_description(*packages, device=device),
            "dtype": dtype, "weights": f"seeded random (seed {seed})", "command": command}


def add_device_args(parser: Any, *, half: bool = True, help: str = "cpu or cuda") -> None:
    """The benchmark scripts' ``--device`` (and, with ``half``, ``--dtype``) options."""
    parser.add_argument("--device", default="cpu", help=help)
    if half:
        parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def checked_device(parser: Any, args: Any) -> bool:
    """Whether ``args.device`` is a GPU; half precision on the CPU is a parser error (the CPU
    figures are fp32)."""
    import torch

    gpu = torch.device(args.device).type == "cuda"
    if getattr(args, "dtype", "float32") != "float32" and not gpu:
        parser.error("--dtype float16/bfloat16 is for GPUs; the CPU figures are fp32")
    return gpu


def device_section(name: str, gpu: bool) -> str:
    """The section of benchmarks.md (and stem of the JSON) a run writes: GPU runs get their own."""
    return f"{name}_cuda" if gpu else name

