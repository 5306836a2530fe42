"""When an image leaves: confidence of an exit head, the exit decision, and threshold calibration.

Tensors only. Two confidence criteria (BranchyNet, Teerapittayanon et al. 2016, uses entropy;
DeeBERT, Xin et al. 2020, entropy too; max softmax probability is the usual alternative):

- ``"max_prob"``: ``max_c softmax(z)_c``; an image exits when it is ``>= threshold``. Any
  threshold above 1 never exits.
- ``"entropy"``: ``-sum_c p_c log p_c`` (nats); an image exits when it is ``<= threshold``. Any
  negative threshold never exits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

__all__ = ["CRITERIA", "NEVER", "confidence", "passes", "exit_mask", "first_exit", "Calibration", "calibrate"]

CRITERIA = ("max_prob", "entropy")
NEVER = {"max_prob": 2.0, "entropy": -1.0}  # a threshold no image passes, per criterion


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"early_exit: criterion must be one of {', '.join(map(repr, CRITERIA))}; got {criterion!r}")


def confidence(logits: torch.Tensor, criterion: str = "max_prob") -> torch.Tensor:
    """``logits: [B, classes]`` -> ``[B]`` float32: max softmax probability or entropy (nats)."""
    check_criterion(criterion)
    logp = torch.log_softmax(logits.float(), dim=-1)  # float32 even for bf16 heads: thresholds are fine-grained
    if criterion == "max_prob":
        return logp.max(dim=-1).values.exp()
    return -(logp.exp() * logp).sum(dim=-1)


def passes(conf: torch.Tensor, threshold, criterion: str = "max_prob") -> torch.Tensor:
    """``conf: [..., B]`` (from ``confidence``) against ``threshold`` (a float or a tensor that
    broadcasts) -> bool, True where the image exits."""
    check_criterion(criterion)
    return conf >= threshold if criterion == "max_prob" else conf <= threshold


def exit_mask(logits: torch.Tensor, threshold: float, criterion: str = "max_prob") -> torch.Tensor:
    """``logits: [B, classes]`` of one exit head -> ``[B]`` bool: which images exit there."""
    return passes(confidence(logits, criterion), threshold, criterion)


def first_exit(conf: torch.Tensor, thresholds: torch.Tensor, criterion: str = "max_prob") -> torch.Tensor:
    """``conf: [K, N]`` at K exits, ``thresholds: [K]`` -> ``[N]`` int64: the first exit each image
    passes, K for the final head. The same rule the patched model applies block by block."""
    hit = passes(conf, thresholds.to(conf)[:, None], criterion)
    hit = torch.cat([hit, hit.new_ones(1, hit.shape[1])])  # the final head takes everyone left
    return hit.int().argmax(dim=0)  # argmax returns the first maximum


@dataclass
class Calibration:
    """What ``calibrate`` chose and what it measured on the held-out data."""

    thresholds: List[float]
    criterion: str
    drop: float  # accuracy lost vs the final head (or disagreement with it, without labels)
    mean_depth: float  # blocks computed per image on average
    exit_fraction: List[float]  # share of images leaving at each exit, then at the final head
    final_accuracy: Optional[float]
    accuracy: Optional[float]


def calibrate(exit_logits: torch.Tensor, final_logits: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
              depths: Sequence[int], final_depth: int, max_drop: float = 0.01, criterion: str = "max_prob",
              grid: int = 200, rounds: int = 3) -> Calibration:
    """Per-exit thresholds that lose at most ``max_drop`` accuracy vs the final head on held-out data.

    exit_logits: ``[K, N, classes]`` of the K exit heads; final_logits: ``[N, classes]``; labels:
    ``[N]`` or None. depths: blocks computed before each exit (``[K]``, increasing); final_depth:
    the model's block count. With labels the drop is ``acc(final) - acc(early exit)``; without,
    the share of images whose prediction differs from the final head's, an upper bound of it.

    The search (documented in docs/early_exit.md):
    1. one shared threshold for all exits: of ``grid`` candidates (quantiles of the confidences)
       the one with the lowest mean depth whose drop is within budget;
    2. then, earliest exit first, each threshold is lowered (max_prob; raised for entropy) to the
       loosest candidate that keeps the whole policy within budget, the others fixed; a looser
       threshold at one exit only moves images earlier, so this spends the remaining budget on the
       earliest exits, as asked. Step 2 repeats up to ``rounds`` times until nothing changes.
    Every candidate is scored by simulating the exact exit rule (``first_exit``) on all images.
    """
    check_criterion(criterion)
    if exit_logits.dim() != 3 or final_logits.dim() != 2 or exit_logits.shape[1:] != final_logits.shape:
        raise ValueError(f"calibrate: exit_logits must be [K, N, classes] and final_logits [N, classes]; got "
                         f"{tuple(exit_logits.shape)} and {tuple(final_logits.shape)}")
    k, n = exit_logits.shape[:2]
    if len(depths) != k or list(depths) != sorted(set(depths)) or not 0 < depths[-1] < final_depth:
        raise ValueError(f"calibrate: depths must be {k} increasing block counts below final_depth={final_depth}; "
                         f"got {list(depths)}")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"calibrate: labels must be [N]={n}; got {tuple(labels.shape)}")
    if not isinstance(max_drop, (int, float)) or not 0.0 <= max_drop < 1.0:
        raise ValueError(f"calibrate: max_drop must be a float in [0, 1); got {max_drop!r}")

    conf = confidence(exit_logits.reshape(k * n, -1), criterion).reshape(k, n)
    final_pred = final_logits.argmax(dim=-1)
    exit_pred = exit_logits.argmax(dim=-1)  # [K, N]
    target = final_pred if labels is None else labels
    correct = torch.cat([exit_pred == target, (final_pred == target)[None]]).float()  # [K+1, N]
    cost = torch.tensor(list(depths) + [final_depth], dtype=torch.float32)
    base = correct[k].mean().item()
    never = NEVER[criterion]

    def score(thr: List[float]):
        first = first_exit(conf, torch.tensor(thr), criterion)
        acc = correct.gather(0, first[None]).mean().item()
        return base - acc, cost[first].mean().item(), first

    # Candidates, most to least exiting: quantiles of each exit's confidence, then "never".
    q = torch.linspace(0, 1, grid)
    desc = criterion == "max_prob"  # for max_prob a lower threshold exits more
    cands = [sorted(set(torch.quantile(conf[i], q).tolist()), reverse=not desc) + [never] for i in range(k)]
    shared = sorted(set(torch.quantile(conf.flatten(), q).tolist()), reverse=not desc) + [never]

    thr = [never] * k
    best = (math.inf, thr)
    for t in shared:  # step 1
        drop, depth, _ = score([t] * k)
        if drop <= max_drop + 1e-12 and depth < best[0]:
            best = (depth, [t] * k)
    thr = list(best[1])
    for _ in range(rounds):  # step 2
        changed = False
        for i in range(k):
            for t in cands[i]:  # from the loosest; the first within budget is the one we keep
                if (t < thr[i]) if desc else (t > thr[i]):
                    trial = thr[:i] + [t] + thr[i + 1:]
                    if score(trial)[0] <= max_drop + 1e-12:
                        thr, changed = trial, True
                        break
                else:
                    break  # candidates from here on are no looser than the current threshold
        if not changed:
            break
    drop, depth, first = score(thr)
    fractions = torch.bincount(first, minlength=k + 1).float() / n
    acc = None if labels is None else base - drop
    return Calibration(thresholds=[float(t) for t in thr], criterion=criterion, drop=drop, mean_depth=depth,
                       exit_fraction=fractions.tolist(), final_accuracy=None if labels is None else base,
                       accuracy=acc)
