"""Fine-tuning a timm ViT for A-ViT halting: task loss + ponder loss + KL toward a prior over
halting depth (Yin et al., CVPR 2022, Sec. 3), with masked attention so shapes stay static.

    result = accel.avit.finetune(vit, batches, steps=500, lr=1e-4, ponder_weight=5e-4,
                                 kl_weight=0.1, prior_mean=6.0, prior_std=2.0)
    accel.patch(vit, avit=result.config)           # inference with real token removal
    accel.avit.save("halting.safetensors", result.config)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..registry import get_patch, scoped
from .config import AViT
from .halting import gaussian_prior, halting_distribution, kl_divergence, ponder_loss
from .timm import AViTTimm

__all__ = ["FinetuneResult", "training_loss", "distillation_loss", "finetune"]

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class FinetuneResult:
    """The halting settings the model was tuned for, and per-step losses (floats)."""

    config: AViT
    history: List[Dict[str, float]] = field(default_factory=list)


def training_loss(model: Any, logits: torch.Tensor, labels: torch.Tensor, *, prior: torch.Tensor,
                  ponder_weight: float, kl_weight: float, label_smoothing: float = 0.0,
                  teacher_logits: Optional[torch.Tensor] = None, distill_weight: float = 0.0,
                  temperature: float = 1.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``cross-entropy + ponder_weight * L_ponder + kl_weight * KL(Hbar || prior)`` for the call
    that produced ``logits`` on ``model`` (patched with ``avit`` in mask mode or training mode),
    plus ``distill_weight * T^2 * KL(teacher || student)`` on logits softened by ``temperature``
    when ``teacher_logits`` are given (e.g. the model's own predictions before fine-tuning).
    Returns the loss and its parts (detached): task, ponder, kl, depth (and distill)."""
    patch = get_patch(model, "avit")
    halting = None if patch is None or patch.state is None else patch.state.halting
    if halting is None or not halting.record:
        raise ValueError("avit.training_loss: the last call did not run the masked halting path; patch the "
                         "model with accel.AViT(mode='mask') (any finite beta) or call it in training mode")
    task = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    ponder = ponder_loss(halting)
    kl = kl_divergence(halting_distribution(halting), prior)
    loss = task + ponder_weight * ponder + kl_weight * kl
    parts = dict(task=task, ponder=ponder, kl=kl, depth=halting.mean_depth())
    if teacher_logits is not None and distill_weight:
        distill = distillation_loss(logits, teacher_logits, temperature)
        loss = loss + distill_weight * distill
        parts["distill"] = distill
    return loss, {k: v.detach() for k, v in parts.items()}


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch (Hinton et al.)."""
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"avit: teacher_logits must have the shape of logits {tuple(logits.shape)}; "
                         f"got {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"avit: temperature must be > 0; got {temperature}")
    target = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature ** 2


def _check(name: str, value: Any, low: float, allowed: str, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"avit.finetune: {name} must be {allowed}; got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"avit.finetune: {name} must be {allowed}; got {value}")
    return float(value)


def _batches(data: Union[Callable[[int], Batch], Iterable[Batch]]) -> Iterable[Batch]:
    if callable(data):
        return (data(step) for step in itertools.count())
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(f"avit.finetune: data must be an iterable of (images, labels) batches or a function "
                    f"step -> (images, labels); got {type(data).__name__}")


def finetune(model: Any, data: Union[Callable[[int], Batch], Iterable[Batch]], *, steps: int,
             lr: float = 1e-4, weight_decay: float = 0.05, warmup_steps: int = 0,
             config: Optional[AViT] = None, ponder_weight: float = 5e-4, kl_weight: float = 0.1,
             prior_mean: Optional[float] = None, prior_std: float = 2.0, label_smoothing: float = 0.0,
             teacher: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, distill_weight: float = 1.0,
             temperature: float = 1.0, clip_grad: Optional[float] = 1.0, log_every: int = 0) -> FinetuneResult:
    """Fine-tune ``model`` (a timm ViT/DeiT, all its parameters) in place for A-ViT halting.

    data: an iterable of ``(images [B, C, H, W], labels [B])`` or a function ``step -> batch``;
        training stops after ``steps`` steps or when the iterable ends.
    config: the halting settings (gamma, beta, eps; default ``AViT()``); training always uses the
        masked formulation, whatever ``config.mode``.
    ponder_weight, kl_weight: weights of the ponder loss and of ``KL(Hbar || prior)``; the prior is
        a Gaussian over depth 1..L with ``prior_mean`` (default 2/3 of the depth) and ``prior_std``.
    teacher: a frozen model (e.g. a copy of ``model`` before fine-tuning) whose predictions the
        fine-tuned model is also distilled toward, with ``distill_weight`` and ``temperature``.
    AdamW with linear warm-up and cosine decay; gradients clipped to ``clip_grad``.
    The model is left in its previous train/eval mode and patch state; patch it with
    ``result.config`` for inference. Returns a ``FinetuneResult``.
    """
    from ...families import is_timm_vit

    if not is_timm_vit(model):
        raise TypeError(f"avit.finetune: model must be a timm VisionTransformer; got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"avit.finetune: steps must be an int >= 1; got {steps!r}")
    lr = _check("lr", lr, 0.0, "a finite float > 0", strict=True)
    weight_decay = _check("weight_decay", weight_decay, 0.0, "a finite float >= 0")
    ponder_weight = _check("ponder_weight", ponder_weight, 0.0, "a finite float >= 0")
    kl_weight = _check("kl_weight", kl_weight, 0.0, "a finite float >= 0")
    distill_weight = _check("distill_weight", distill_weight, 0.0, "a finite float >= 0")
    temperature = _check("temperature", temperature, 0.0, "a finite float > 0", strict=True)
    if teacher is not None and not callable(teacher):
        raise TypeError(f"avit.finetune: teacher must be a model (callable on images) or None; "
                        f"got {type(teacher).__name__}")
    if teacher is model:
        raise ValueError("avit.finetune: teacher must be a frozen copy, not the model being fine-tuned "
                         "(copy.deepcopy(model) before calling)")
    depth = len(model.blocks)
    prior_mean = 2.0 * depth / 3.0 if prior_mean is None else prior_mean
    prior_mean = _check("prior_mean", prior_mean, 1.0, f"a float in [1, {depth}] (halting depth)")
    if prior_mean > depth:
        raise ValueError(f"avit.finetune: prior_mean must be a float in [1, {depth}] (halting depth); got {prior_mean}")
    prior = gaussian_prior(depth, prior_mean, _check("prior_std", prior_std, 0.0, "a finite float > 0", strict=True))
    config = AViT() if config is None else AViT.coerce(config)
    if config.never_halts:
        raise ValueError("avit.finetune: config.beta is inf (nothing can halt); give a finite beta")
    batches = _batches(data)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    result = FinetuneResult(config=config)
    was_training = model.training
    with scoped(model, {"avit": AViTTimm(model, replace(config, mode="mask"))}):
        model.train()
        try:
            for step, (images, labels) in zip(range(steps), batches):
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                loss, parts = training_loss(model, model(images), labels, prior=prior, ponder_weight=ponder_weight,
                                            kl_weight=kl_weight, label_smoothing=label_smoothing,
                                            teacher_logits=teacher_logits, distill_weight=distill_weight,
                                            temperature=temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                optimizer.step()
                scheduler.step()
                record = {"step": step + 1, "loss": float(loss.detach())}
                record.update({k: float(v) for k, v in parts.items()})
                result.history.append(record)
                if log_every and (step + 1) % log_every == 0:
                    print("avit finetune " + " ".join(f"{k} {v:.4g}" for k, v in record.items()), flush=True)
        finally:
            model.train(was_training)
    return result
