"""Settings of TokenExit and the shorthand values ``accel.patch(..., token_exit=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TokenExit"]


@dataclass(frozen=True)
class TokenExit:
    """Per-token early exit, training-free (after SACT, Figurnov et al., CVPR 2017).

    After each block, a patch token whose relative update ``||x_out - x_in|| / ||x_in||`` is
    below ``threshold`` stops: later blocks do not use it as a query nor run their MLP on it,
    but it stays a key and value for the tokens still active, and its frozen state goes to the
    final norm and head. ``min_depth`` blocks run on every token before any may stop. Prefix
    tokens (CLS, registers, distillation token) never stop. ``threshold=0`` (and ``halting``
    off) never exits: the unpatched model.

    halting: a second criterion, A-ViT's (Yin et al., CVPR 2022): a token also stops once its
        halting scores ``sigmoid(gamma * x[0] - beta)`` (embedding dimension 0 of each block's
        output) add up to ``1 - eps``. Meaningful for models fine-tuned for halting
        (``accel.avit.finetune``); the stopped token keeps its last state (not A-ViT's
        halting-weighted mean).
    """

    threshold: float = 0.05
    min_depth: int = 1
    halting: bool = False
    gamma: float = 10.0
    beta: float = 30.0
    eps: float = 0.01

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"TokenExit: threshold must be a float >= 0 (relative residual norm); "
                            f"got {type(t).__name__}")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"TokenExit: threshold must be a finite float >= 0 (relative residual norm); got {t}")
        object.__setattr__(self, "threshold", float(t))
        d = self.min_depth
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"TokenExit: min_depth must be an int >= 1 (blocks before a token may stop); "
                            f"got {type(d).__name__}")
        if d < 1:
            raise ValueError(f"TokenExit: min_depth must be an int >= 1 (blocks before a token may stop); got {d}")
        if not isinstance(self.halting, bool):
            raise TypeError(f"TokenExit: halting must be a bool; got {type(self.halting).__name__}")
        for name, ok, allowed in (("gamma", lambda v: math.isfinite(v), "a finite float"),
                                  ("beta", lambda v: not math.isnan(v), "a float (math.inf: never halt)"),
                                  ("eps", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"TokenExit: {name} must be {allowed}; got {type(value).__name__}")
            if not ok(float(value)):
                raise ValueError(f"TokenExit: {name} must be {allowed}; got {value}")
            object.__setattr__(self, name, float(value))

    def never_exits(self) -> bool:
        return self.threshold == 0 and not self.halting

    @classmethod
    def coerce(cls, value: Any) -> "TokenExit":
        """``token_exit=0.05`` -> TokenExit(threshold=0.05); a dict -> TokenExit(**dict)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            raise TypeError("token_exit: give a threshold (float >= 0) or accel.TokenExit(...), not a bool")
        if isinstance(value, (int, float)):
            return cls(threshold=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(
            "token_exit: expected accel.TokenExit(...), a float threshold >= 0 or a dict of settings; "
            f"got {type(value).__name__}"
        )
