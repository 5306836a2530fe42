"""Settings of AViT, the shorthand values ``accel.patch(..., avit=...)`` accepts, and the small
halting file (``save``/``load``) that holds them apart from the backbone's weights."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..base import config_dict
from ..settings import Settings, check_choice, check_real

__all__ = ["AViT", "MODES", "save", "load"]

MODES = ("remove", "mask")
_FORMAT = "accel-avit-halting"
_PARAMS = ("gamma", "beta", "eps")


@dataclass(frozen=True)
class AViT(Settings):
    """A-ViT adaptive token halting (Yin et al., CVPR 2022) for timm ViTs.

    After every block each patch token gets a halting score ``sigmoid(gamma * x[0] - beta)``
    from its embedding dimension 0; a token halts once its scores add up to ``1 - eps``, leaves
    the computation (later blocks neither compute it nor attend to it) and keeps the paper's
    halting-weighted state for the final norm and head. Prefix tokens (CLS, distillation,
    registers) never halt: the head always reads full-depth prefix tokens.

    gamma, beta: scale and offset of the halting score (A-ViT's DeiT-Tiny recipe: 10, 30). A model
        must be fine-tuned for its halting (``accel.avit.finetune``) to halt sensibly.
    eps: a token halts when its cumulative score reaches ``1 - eps``; in [0, 1).
    mode: ``"remove"`` (default) gathers halted tokens out, so later blocks compute fewer tokens;
        ``"mask"`` keeps static shapes and masks halted tokens out of attention as keys (the
        training formulation; also used for any call in training mode). Same outputs.

    Identity: ``beta=math.inf`` makes every score exactly 0, so no token halts before the last
    block and the output is the unpatched model's, bit for bit (timm's blocks run untouched).

    Shorthand: ``avit=accel.AViT(...)``, a dict of these settings, or the path (str or Path) of a
    halting file written by ``accel.avit.save`` (``accel.avit.load`` reads it).
    """

    gamma: float = 10.0
    beta: float = 30.0
    eps: float = 0.01
    mode: str = "remove"

    METHOD = "avit"
    EXPECTED = "a dict of settings, or the path of a halting file (accel.avit.save)"

    def __post_init__(self) -> None:
        checks = (("gamma", lambda v: math.isfinite(v) and v >= 0, "a finite float >= 0 (halting score scale)"),
                  ("beta", lambda v: not math.isnan(v) and v != -math.inf,
                   "a finite float or math.inf (halting score offset; inf: never halt)"),
                  ("eps", lambda v: 0.0 <= v < 1.0, "a float in [0, 1) (halting threshold 1 - eps)"))
        for name, ok, allowed in checks:
            object.__setattr__(self, name, check_real("AViT", name, getattr(self, name), ok, allowed))
        object.__setattr__(self, "mode", check_choice("AViT", "mode", self.mode, MODES))

    @property
    def never_halts(self) -> bool:
        """Scores are exactly 0 (``beta = inf``): the unpatched model."""
        return self.beta == math.inf

    def state_dict(self) -> Dict[str, Any]:
        """The halting parameters as scalar tensors: ``{"gamma", "beta", "eps"}``."""
        import torch

        return {name: torch.tensor(getattr(self, name), dtype=torch.float64) for name in _PARAMS}

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``avit="halting.safetensors"`` -> the settings saved there (``accel.avit.save``)."""
        return config_dict(load(value)) if isinstance(value, (str, Path)) else None


def save(path: Union[str, Path], config: AViT, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``config``'s halting parameters (``AViT.state_dict``) and mode to a small
    safetensors file; ``metadata``: extra strings kept beside them. Returns the path."""
    from safetensors.torch import save_file

    if not isinstance(config, AViT):
        raise TypeError(f"avit.save: config must be an accel.AViT; got {type(config).__name__}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=_FORMAT, mode=config.mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.reshape(1) for k, v in config.state_dict().items()}, str(path), metadata=meta)
    return path


def load(path: Union[str, Path], **overrides: Any) -> AViT:
    """The ``AViT`` saved at ``path`` by ``save``; keyword overrides (``mode="mask"``) replace
    settings. ``FileNotFoundError``/``ValueError`` for a missing or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"avit: no halting file at {path} (write one with accel.avit.save)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"avit: {path} is not a halting file written by accel.avit.save ({exc})") from None
    if meta.get("format") != _FORMAT or set(tensors) != set(_PARAMS):
        raise ValueError(f"avit: {path} is not a halting file written by accel.avit.save")
    config = AViT(**{k: float(tensors[k].reshape(())) for k in _PARAMS}, mode=meta.get("mode", "remove"))
    return replace(config, **overrides) if overrides else config


def metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The strings saved with a halting file (``format``, ``mode`` and the caller's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
