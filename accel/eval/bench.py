"""Speed and agreement of patched models against the unpatched one, measured side by side."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .progress import progress_bar
from .timing import cpu_per_wall, time_interleaved

__all__ = ["BenchRow", "accuracy", "top1_agreement", "logit_cosine", "compare_variants", "patched_copy",
           "device_sync"]


@dataclass
class BenchRow:
    model: str
    batch: int
    method: str
    settings: str
    baseline_items_s: float
    items_s: float
    speedup: float
    top1_agreement: float
    logit_cosine: float
    baseline_accuracy: Optional[float] = None
    accuracy: Optional[float] = None
    cpu_per_wall: Optional[float] = None  # of the whole interleaved timing (``timing.cpu_per_wall``)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows whose argmax matches the reference's: ``[B, K]`` each."""
    return (logits.argmax(dim=-1) == reference.argmax(dim=-1)).float().mean().item()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label: ``logits [B, K]``, ``labels [B]``."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def logit_cosine(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of each row of logits with the reference row."""
    return torch.nn.functional.cosine_similarity(logits.float(), reference.float(), dim=-1).mean().item()


def device_sync(device: Any) -> Optional[Callable[[], None]]:
    """What waits for ``device``'s queued work (``torch.cuda.synchronize`` on CUDA), None on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def patched_copy(model: torch.nn.Module, **methods: Any) -> torch.nn.Module:
    """A deep copy of ``model`` with ``accel.patch(copy, **methods)`` applied."""
    from .. import patch

    return patch(copy.deepcopy(model), **methods)


def compare_variants(
    baseline: Callable[[torch.Tensor], torch.Tensor],
    variants: Dict[str, Callable[[torch.Tensor], torch.Tensor]],
    inputs: torch.Tensor,
    *,
    model_name: str,
    method: Union[str, Dict[str, str]],
    repeats: int = 5,
    warmup: int = 1,
    agreement_inputs: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    eval_batch: Optional[int] = None,
    progress: Optional[str] = None,
    log: Optional[Callable[[str], Any]] = None,
) -> List[BenchRow]:
    """Time ``baseline`` and every variant interleaved on ``inputs`` ``[B, ...]``; agreement (and
    accuracy, given ``labels [N]``) on ``agreement_inputs`` ``[N, ...]`` (default: ``inputs``), in
    chunks of ``eval_batch`` (default: all at once). ``method``: one name for every row, or
    {variant: name}. ``progress``: a label for progress bars on stderr; ``log`` (e.g. ``print``) is told
    how long the timing will take. One row per variant, in order."""
    batch = inputs.shape[0]
    methods = method if isinstance(method, dict) else {name: method for name in variants}
    calls = {"baseline": lambda: baseline(inputs)}
    calls.update({name: (lambda fn=fn: fn(inputs)) for name, fn in variants.items()})
    check = inputs if agreement_inputs is None else agreement_inputs
    step = eval_batch or len(check)

    def classify(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return torch.cat([fn(check[i:i + step]) for i in range(0, len(check), step)])

    with torch.inference_mode():
        timings = time_interleaved(calls, repeats=repeats, warmup=warmup, items_per_call=batch,
                                   sync=device_sync(inputs.device), log=log,
                                   progress=f"{progress}: timing" if progress else None)
        used = cpu_per_wall(timings)
        with progress_bar(f"{progress}: agreement and accuracy" if progress else None, total=len(variants) + 1,
                          unit="model") as bar:
            reference = classify(baseline)
            bar.update()
            base_acc = None if labels is None else accuracy(reference, labels)
            rows = []
            for name, fn in variants.items():
                logits = classify(fn)
                bar.update()
                rows.append(
                    BenchRow(
                        model=model_name,
                        batch=batch,
                        method=methods[name],
                        settings=name,
                        baseline_items_s=timings["baseline"].items_per_s,
                        items_s=timings[name].items_per_s,
                        speedup=timings[name].speedup_over(timings["baseline"]),
                        top1_agreement=top1_agreement(logits, reference),
                        logit_cosine=logit_cosine(logits, reference),
                        baseline_accuracy=base_acc,
                        accuracy=None if labels is None else accuracy(logits, labels),
                        cpu_per_wall=used,
                    )
                )
    return rows
