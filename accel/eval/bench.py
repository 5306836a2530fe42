"""Speed and agreement of patched models against the unpatched one, measured side by side."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .timing import time_interleaved

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
    from .. import api

    return api.patch(copy.deepcopy(model), **methods)


def compare_variants(
    baseline: Callable[[torch.Tensor], torch.Tensor],
    variants: Dict[str, Callable[[torch.Tensor], torch.Tensor]],
    inputs: torch.Tensor,
    *,
    model_name: str,
    method: str,
    repeats: int = 5,
    warmup: int = 1,
    agreement_inputs: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
) -> List[BenchRow]:
    """Time ``baseline`` and every variant interleaved on ``inputs``; agreement (and accuracy,
    given ``labels``) on ``agreement_inputs`` (default: ``inputs``). One row per variant, in order."""
    batch = inputs.shape[0]
    calls = {"baseline": lambda: baseline(inputs)}
    calls.update({name: (lambda fn=fn: fn(inputs)) for name, fn in variants.items()})
    with torch.inference_mode():
        timings = time_interleaved(calls, repeats=repeats, warmup=warmup, items_per_call=batch,
                                   sync=device_sync(inputs.device))
        check = inputs if agreement_inputs is None else agreement_inputs
        reference = baseline(check)
        base_acc = None if labels is None else accuracy(reference, labels)
        rows = []
        for name, fn in variants.items():
            logits = fn(check)
            rows.append(
                BenchRow(
                    model=model_name,
                    batch=batch,
                    method=method,
                    settings=name,
                    baseline_items_s=timings["baseline"].items_per_s,
                    items_s=timings[name].items_per_s,
                    speedup=timings[name].speedup_over(timings["baseline"]),
                    top1_agreement=top1_agreement(logits, reference),
                    logit_cosine=logit_cosine(logits, reference),
                    baseline_accuracy=base_acc,
                    accuracy=None if labels is None else accuracy(logits, labels),
                )
            )
    return rows
