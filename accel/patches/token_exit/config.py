"""Settings of TokenExit and the shorthand values ``accel.patch(..., token_exit=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..settings import Settings, check_bool, check_int, check_real, is_real

__all__ = ["TokenExit"]


@dataclass(frozen=True)
class TokenExit(Settings):
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

    METHOD = "token_exit"
    EXPECTED = "a float threshold >= 0 or a dict of settings"

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_real(
            "TokenExit", "threshold", self.threshold, lambda v: math.isfinite(v) and v >= 0,
            "a finite float >= 0 (relative residual norm)"))
        object.__setattr__(self, "min_depth", check_int("TokenExit", "min_depth", self.min_depth, 1,
                                                        "an int >= 1 (blocks before a token may stop)"))
        object.__setattr__(self, "halting", check_bool("TokenExit", "halting", self.halting))
        for name, ok, allowed in (("gamma", math.isfinite, "a finite float"),
                                  ("beta", lambda v: not math.isnan(v), "a float (math.inf: never halt)"),
                                  ("eps", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")):
            object.__setattr__(self, name, check_real("TokenExit", name, getattr(self, name), ok, allowed))

    def never_exits(self) -> bool:
        return self.threshold == 0 and not self.halting

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``token_exit=0.05`` -> TokenExit(threshold=0.05)."""
        return {"threshold": value} if is_real(value) else None
