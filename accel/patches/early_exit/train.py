"""Training and calibrating exit heads on a frozen timm ViT by self-distillation from its own head.

The backbone never changes: its features at the exit blocks and its final logits are computed
once, under ``no_grad`` in eval mode, for all the data (pooled features are small: N x K x D
floats), and the heads are then trained on them for as many epochs as asked. Loss per exit
(knowledge distillation, Hinton et al. 2015, as in DeeBERT/BERxiT-style self-distillation):

    T^2 * KL(softmax(z_final / T) || softmax(z_exit / T))  [+ label_weight * CE(z_exit, y)]

summed over the exits.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .heads import ExitHeads
from .policy import Calibration, calibrate
from .timm import backbone_exits

__all__ = ["fit_heads", "train_on_features", "exit_outputs", "calibrate_heads", "store_calibration"]

Data = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], Iterable[Any]]


def _batches(data: Data, batch_size: int):
    """Yield ``(x, y or None)`` from images, ``(images, labels)`` or an iterable of batches."""
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
            raise ValueError(f"early_exit: labels must be a tensor [N] matching the images; got {type(y).__name__}")
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], None if y is None else y[start:start + batch_size]
        return
    if not hasattr(data, "__iter__"):
        raise TypeError("early_exit: data must be images [N, C, H, W], (images, labels) or an iterable of batches "
                        f"(images or (images, labels)); got {type(data).__name__}")
    for item in data:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            yield item[0], item[1]
        else:
            raise TypeError(f"early_exit: each batch must be images or (images, labels); got {type(item).__name__}")


@torch.no_grad()
def exit_outputs(model: Any, heads: ExitHeads, data: Data, batch_size: int = 256, logits: bool = True):
    """Run the frozen backbone once over ``data``.

    Returns ``(exit, final [N, classes], labels [N] or None)`` where ``exit`` is the exit heads'
    logits ``[K, N, classes]`` (``logits=True``) or the pooled features ``[K, N, D]`` they read.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats: List[torch.Tensor] = []
    finals: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    try:
        for x, y in _batches(data, batch_size):
            pooled, final = backbone_exits(model, x.to(device), heads)
            pooled = torch.stack(pooled).float()
            if logits:
                pooled = torch.stack([heads.heads[k](pooled[k].to(next(heads.parameters()).device))
                                      for k in range(len(heads.blocks))])
            feats.append(pooled)
            finals.append(final.float())
            if y is not None:
                labels.append(y)
    finally:
        model.train(was_training)
    if labels and len(labels) != len(finals):
        raise ValueError("early_exit: some batches had labels and some had none")
    return torch.cat(feats, dim=1), torch.cat(finals), torch.cat(labels).to(device) if labels else None


def fit_heads(model: Any, data: Data, blocks: Optional[Sequence[int]] = None, *, heads: Optional[ExitHeads] = None,
              epochs: int = 10, steps: Optional[int] = None, lr: float = 1e-3, weight_decay: float = 0.01,
              temperature: float = 2.0, label_weight: float = 0.0, batch_size: int = 256, hidden: int = 0,
              pool: Optional[str] = None, seed: int = 0, log_every: int = 0) -> ExitHeads:
    """Train exit heads after ``blocks`` of the frozen ``model`` (a timm ViT) by self-distillation.

    data: images ``[N, C, H, W]`` (already preprocessed), ``(images, labels)``, or an iterable of
        such batches. Labels are used only when ``label_weight > 0``.
    blocks: 0-based block indices to exit after (or pass ``heads`` to continue training them).
    epochs / steps: passes over the cached features, or a fixed number of optimiser steps.
    temperature: T of the distillation loss; pool: ``"token"``/``"avg"`` (default: the model's own,
        ``"avg"`` unless ``global_pool='token'``); hidden: width of the heads' hidden layer (0: none).
    Returns the heads in eval mode; the backbone's parameters are never changed.
    """
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"fit_heads: {name} must be an int >= {low}; got {value!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"fit_heads: steps must be an int >= 1 or None; got {steps!r}")
    if not temperature > 0 or not lr > 0 or label_weight < 0:
        raise ValueError(f"fit_heads: temperature and lr must be > 0 and label_weight >= 0; got "
                         f"temperature={temperature}, lr={lr}, label_weight={label_weight}")
    if heads is None:
        if blocks is None:
            raise ValueError("fit_heads: give blocks (0-based block indices to exit after) or heads")
        if pool is None:
            pool = "token" if getattr(model, "global_pool", "token") == "token" else "avg"
        heads = ExitHeads(blocks, dim=model.embed_dim, num_classes=model.num_classes, pool=pool,
                          num_prefix_tokens=model.num_prefix_tokens, hidden=hidden)
    elif blocks is not None and list(blocks) != heads.blocks:
        raise ValueError(f"fit_heads: blocks {list(blocks)} differ from the given heads' {heads.blocks}")
    if heads.blocks[-1] >= len(model.blocks) - 1:
        raise ValueError(f"fit_heads: exit blocks must be below {len(model.blocks) - 1}; got {heads.blocks}")
    device = next(model.parameters()).device
    heads = heads.to(device=device, dtype=torch.float32)

    feats, teacher, labels = exit_outputs(model, heads, data, batch_size, logits=False)  # [K, N, D], [N, cls]
    if label_weight > 0 and labels is None:
        raise ValueError("fit_heads: label_weight > 0 needs labels: pass (images, labels)")
    return train_on_features(heads, feats, teacher, labels, epochs=epochs, steps=steps, lr=lr,
                             weight_decay=weight_decay, temperature=temperature, label_weight=label_weight,
                             batch_size=batch_size, seed=seed, log_every=log_every)


def train_on_features(heads: ExitHeads, feats: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                      *, epochs: int = 10, steps: Optional[int] = None, lr: float = 1e-3, weight_decay: float = 0.01,
                      temperature: float = 2.0, label_weight: float = 0.0, batch_size: int = 256, seed: int = 0,
                      log_every: int = 0) -> ExitHeads:
    """The training loop of ``fit_heads`` on cached features: ``feats: [K, N, D]`` pooled at the K
    exits, ``teacher: [N, classes]`` final logits, ``labels: [N]`` or None (used when ``label_weight > 0``)."""
    n = feats.shape[1]
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    soft = F.softmax(teacher / temperature, dim=-1)
    heads.train()
    losses: List[float] = []
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen).to(feats.device)
        for start in range(0, n, batch_size):
            if step >= total:
                break
            idx = order[start:start + batch_size]
            loss = feats.new_zeros(())
            for k, head in enumerate(heads.heads):
                z = head(feats[k, idx])
                # KL(p_teacher || q_exit) at temperature T, scaled by T^2 so gradients keep their size
                loss = loss + F.kl_div(F.log_softmax(z / temperature, dim=-1), soft[idx],
                                       reduction="batchmean") * temperature ** 2
                if label_weight > 0:
                    loss = loss + label_weight * F.cross_entropy(z, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if log_every and step % log_every == 0:
                print(f"fit_heads step {step}/{total} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    heads.eval()
    heads.metrics["fit"] = {"steps": total, "lr": lr, "temperature": temperature, "label_weight": label_weight,
                            "first_loss": losses[0], "last_loss": sum(losses[-per_epoch:]) / len(losses[-per_epoch:])}
    return heads


def calibrate_heads(model: Any, heads: ExitHeads, data: Data, *, max_drop: float = 0.01, criterion: str = "max_prob",
                    batch_size: int = 256, **kwargs: Any) -> Calibration:
    """Choose ``heads.thresholds`` on held-out ``data`` (``(images, labels)``, or images: then the
    drop is the disagreement with the final head) with ``policy.calibrate``; stores the thresholds,
    the criterion and the measured figures on ``heads`` and returns them."""
    exit_logits, final, labels = exit_outputs(model, heads, data, batch_size)
    result = calibrate(exit_logits, final, labels, depths=heads.depths, final_depth=len(model.blocks),
                       max_drop=max_drop, criterion=criterion, **kwargs)
    store_calibration(heads, result, max_drop, int(final.shape[0]))
    return result


def store_calibration(heads: ExitHeads, result: Calibration, max_drop: float, images: int) -> None:
    """Make ``result`` the heads' thresholds and criterion, and record its figures in ``heads.metrics``."""
    heads.thresholds, heads.criterion = list(result.thresholds), result.criterion
    heads.metrics["calibration"] = {"max_drop": max_drop, "images": images, **vars(result)}
