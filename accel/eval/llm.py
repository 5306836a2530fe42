"""Measuring small language models: held-out loss, how often Mixture-of-Depths' causal decisions
agree with top-k, and greedy decoding speed, interleaved. Used by ``accel bench --llm`` on the three
shipped study models and by ``scripts/train_llm_study.py``.

    loss = heldout_loss(model, ids, context=256)                # mean next-token loss, nats
    agree = causal_agreement(model, routers, ids, 256)          # MoD: fraction of decisions = top-k
    prompts = spread_prompts(ids, count=4, length=64)          # [1, 64] prompts from across the text
    record = bench_study_models(prompts=4, new_tokens=64)       # the shipped dense / MoE / MoD models
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["windows", "heldout_loss", "causal_agreement", "spread_prompts", "decode_rates", "bench_study_models"]


def windows(ids: torch.Tensor, context: int, count: Optional[int] = None) -> torch.Tensor:
    """The first ``count`` (default: all) non-overlapping windows of ``context + 1`` tokens of a 1-D
    token stream ``ids``, each overlapping the next by one token: ``[n, context + 1]`` (long)."""
    available = (len(ids) - 1) // context
    n = available if count is None else min(count, available)
    if n < 1:
        raise ValueError(f"windows: {len(ids)} tokens hold no window of {context + 1}")
    return torch.stack([ids[i * context:i * context + context + 1] for i in range(n)]).long()


def heldout_loss(model: Any, ids: torch.Tensor, context: int, count: Optional[int] = None, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over windows of ``ids`` (see ``windows``):
    every window's ``context`` predictions, in float32."""
    rows = windows(ids, context, count)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            logits = model(chunk[:, :-1], use_cache=False).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
    return total / (len(rows) * context)


def causal_agreement(model: Any, routers: Any, ids: torch.Tensor, context: int, count: Optional[int] = None,
                     by: str = "predictor", batch: int = 16) -> float:
    """For a model wrapped by ``accel.llm.mod``: how often a causal decision (``by``: the predictors',
    or the routers' own logits > 0) equals top-k membership, over the windows of ``ids``, every
    wrapped layer and token counted alike."""
    rows = windows(ids, context, count)[:, :-1]
    agree = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            model(chunk, use_cache=False)
            fractions = routers.agreement(by)
            agree += len(chunk) * sum(fractions.values()) / len(fractions)
    return agree / len(rows)


def spread_prompts(ids: torch.Tensor, count: int, length: int) -> List[torch.Tensor]:
    """``count`` prompts ``[1, length]`` (long) cut from a 1-D token stream ``ids`` at even spacing."""
    return [ids[i * (len(ids) // count):i * (len(ids) // count) + length].long()[None] for i in range(count)]


def decode_rates(models: Dict[str, Any], prompts: List[torch.Tensor], new_tokens: int, repeats: int = 3
                 ) -> Tuple[Dict[str, float], Optional[float]]:
    """Greedy decoding speed of each model on the same prompts (``[1, n]`` each, ``new_tokens`` each,
    no early stop), interleaved (``accel.eval.timing.time_interleaved``), medians: ({name: tokens/s},
    CPU seconds used per wall second while timing)."""
    from .timing import cpu_per_wall, time_interleaved

    def decode(model: Any) -> None:
        for ids in prompts:
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=model.config.pad_token_id)
    with torch.inference_mode():
        timings = time_interleaved({name: (lambda m=m: decode(m)) for name, m in models.items()}, repeats=repeats,
                                   warmup=1)
    return {name: len(prompts) * new_tokens / t.median_s for name, t in timings.items()}, cpu_per_wall(timings)


def bench_study_models(prompts: int = 4, prompt_tokens: int = 64, new_tokens: int = 64, repeats: int = 3,
                       count: Optional[int] = None) -> Dict[str, Any]:
    """The shipped study models (``accel.pipelines.load("study-dense" | "study-moe" | "study-mod")``)
    on the held-out text shipped with them: held-out loss, forward FLOPs per token, MoD's predictor
    agreement and greedy decoding speed. {"rows": [...], "cpu_per_wall": ..., "load average": ...}."""
    from ..llm.mod import routers_of
    from ..pipelines.llm_study import ARCHS, forward_flops, heldout_tokens, load_study_model

    ids = heldout_tokens()
    models, rows = {}, []
    for arch in ARCHS:
        model, _ = load_study_model(arch)
        models[arch] = model
        row = {"model": f"study-{arch}", "parameters": sum(p.numel() for p in model.parameters()),
               "forward MFLOPs per token": forward_flops(arch, model.config, 256) / 1e6,
               "held-out loss": heldout_loss(model, ids, 256, count)}
        routers = routers_of(model)
        if routers is not None:
            row["predictor agreement"] = causal_agreement(model, routers, ids, 256, count)
        rows.append(row)
    rates, used = decode_rates(models, spread_prompts(ids, prompts, prompt_tokens), new_tokens, repeats)
    for row, arch in zip(rows, ARCHS):
        row["decode tokens/s"] = rates[arch]
        row["decode speedup"] = rates[arch] / rates["dense"]
    return {"rows": rows, "cpu_per_wall": used, "load average": os.getloadavg()[0]}
