"""Exit heads: small classifiers read after chosen blocks (BranchyNet, Teerapittayanon et al. 2016;
DeeBERT, Xin et al. 2020), kept apart from the backbone with their own state dict.

Each head pools the block output the way the model's own head does (``"token"``: the CLS token,
``"avg"``: the mean of the non-prefix tokens), then LayerNorm, an optional hidden layer with GELU,
and a Linear to the classes. Shapes: block output ``x: [B, N, C]``, pooled ``[B, C]``, logits
``[B, classes]``.

    heads = ExitHeads(blocks=(1, 3, 5, 7), dim=128, num_classes=10)   # after model.blocks[1], [3], ...
    save_heads("assets/fashion-vit-exits", heads)                       # exit_heads.safetensors + .json
    heads = load_heads("assets/fashion-vit-exits")
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..settings import is_int
from .policy import CRITERIA

__all__ = ["POOLS", "ExitHead", "ExitHeads", "save_heads", "load_heads", "WEIGHTS_FILE", "CONFIG_FILE"]

POOLS = ("token", "avg")
WEIGHTS_FILE = "exit_heads.safetensors"
CONFIG_FILE = "exit_heads.json"


class ExitHead(nn.Module):
    """``pooled: [B, C]`` -> ``[B, classes]``: LayerNorm, [Linear + GELU], Linear."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.GELU()) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or dim, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.norm(pooled)))


class ExitHeads(nn.Module):
    """One ``ExitHead`` per exit block, with what is needed to use them.

    blocks: 0-based indices into ``model.blocks`` (increasing); exit ``k`` reads the output of
        ``model.blocks[blocks[k]]``, so an image leaving there has run ``blocks[k] + 1`` blocks.
    pool: ``"token"`` (CLS token, for ``global_pool='token'`` models) or ``"avg"`` (mean of the tokens
        after the ``num_prefix_tokens`` prefix tokens).
    thresholds, criterion, metrics: calibration results carried along (plain attributes, saved in
        the json, not in the state dict); ``accel.patch(vit, early_exit=heads)`` uses them.
    """

    def __init__(self, blocks: Sequence[int], dim: int, num_classes: int, pool: str = "token",
                 num_prefix_tokens: int = 1, hidden: int = 0, thresholds: Optional[Sequence[float]] = None,
                 criterion: str = "max_prob", metrics: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        blocks = list(blocks) if isinstance(blocks, (list, tuple)) else blocks
        if not isinstance(blocks, list) or not blocks or not all(is_int(b) and b >= 0 for b in blocks):
            raise ValueError(f"ExitHeads: blocks must be a non-empty list of block indices >= 0; got {blocks!r}")
        blocks = [int(b) for b in blocks]
        if blocks != sorted(set(blocks)):
            raise ValueError(f"ExitHeads: blocks must be strictly increasing; got {blocks}")
        for name, value, low in (("dim", dim, 1), ("num_classes", num_classes, 1), ("hidden", hidden, 0),
                                 ("num_prefix_tokens", num_prefix_tokens, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"ExitHeads: {name} must be an int >= {low}; got {value!r}")
        if pool not in POOLS:
            raise ValueError(f"ExitHeads: pool must be one of {', '.join(map(repr, POOLS))}; got {pool!r}")
        if pool == "token" and num_prefix_tokens < 1:
            raise ValueError("ExitHeads: pool='token' reads the CLS token, but num_prefix_tokens is 0; use pool='avg'")
        if criterion not in CRITERIA:
            raise ValueError(f"ExitHeads: criterion must be one of {', '.join(map(repr, CRITERIA))}; got {criterion!r}")
        if thresholds is not None:
            thresholds = [float(t) for t in thresholds]
            if len(thresholds) != len(blocks) or not all(math.isfinite(t) for t in thresholds):
                raise ValueError(f"ExitHeads: thresholds must be {len(blocks)} finite floats; got {thresholds}")
        self.blocks = blocks
        self.dim, self.num_classes, self.hidden = dim, num_classes, hidden
        self.pool, self.num_prefix_tokens = pool, num_prefix_tokens
        self.thresholds, self.criterion = thresholds, criterion
        self.metrics = dict(metrics or {})
        self.heads = nn.ModuleList(ExitHead(dim, num_classes, hidden) for _ in blocks)

    @property
    def depths(self):
        """Blocks computed before each exit: ``[b + 1 for b in blocks]``."""
        return [b + 1 for b in self.blocks]

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Block output ``[B, N, C]`` -> ``[B, C]``."""
        return x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, classes]`` of exit ``index`` (position in ``blocks``) from the block output ``x``."""
        return self.heads[index](self.pool_tokens(x))

    def settings(self) -> Dict[str, Any]:
        """Everything but the weights, as JSON values."""
        return {"blocks": list(self.blocks), "dim": self.dim, "num_classes": self.num_classes,
                "hidden": self.hidden, "pool": self.pool, "num_prefix_tokens": self.num_prefix_tokens,
                "thresholds": self.thresholds, "criterion": self.criterion, "metrics": self.metrics}

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, pool={self.pool!r}, thresholds={self.thresholds}, criterion={self.criterion!r}"


def save_heads(path: Union[str, Path], heads: ExitHeads) -> Path:
    """Write ``heads`` to the folder ``path``: ``exit_heads.safetensors`` (weights, fp32) and
    ``exit_heads.json`` (blocks, pooling, thresholds, criterion, metrics). Returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(heads, ExitHeads):
        raise TypeError(f"save_heads: heads must be an ExitHeads; got {type(heads).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(heads.settings(), indent=2) + "\n")
    return folder


def load_heads(path: Union[str, Path]) -> ExitHeads:
    """The ``ExitHeads`` saved by ``save_heads`` in the folder ``path`` (fp32, CPU, eval mode)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"load_heads: {folder} holds no {CONFIG_FILE} + {WEIGHTS_FILE} (see save_heads)")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    heads = ExitHeads(**settings)
    heads.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return heads.eval()
