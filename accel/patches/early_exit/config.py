"""Settings of EarlyExit and the shorthand values ``accel.patch(..., early_exit=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from ..settings import Settings, check_choice, is_real
from .heads import ExitHeads, load_heads
from .policy import CRITERIA, NEVER

__all__ = ["EarlyExit"]


@dataclass(frozen=True, eq=False)
class EarlyExit(Settings):
    """Early exit per image (BranchyNet, Teerapittayanon et al. 2016; DeeBERT, Xin et al. 2020).

    heads: trained ``ExitHeads`` (``accel.early_exit.fit_heads``), or the folder they were saved
        to (``save_heads``), which is loaded.
    thresholds: one float per exit, or one float for all; None takes the calibrated thresholds
        stored with the heads. ``"max_prob"``: an image exits when its max softmax probability is
        ``>=`` the threshold (above 1: never); ``"entropy"``: when its entropy (nats) is ``<=`` it
        (below 0: never).
    criterion: ``"max_prob"`` or ``"entropy"``; None takes the heads' own (the one calibrated).

    Shorthands: ``early_exit=heads`` (an ``ExitHeads``), ``early_exit="assets/fashion-vit-exits"``
    (a saved folder), both with their calibrated thresholds; a dict of these settings.
    """

    heads: Union[ExitHeads, str, Path]
    thresholds: Optional[Union[float, Sequence[float]]] = None
    criterion: Optional[str] = None

    METHOD = "early_exit"
    EXPECTED = ("trained accel.early_exit.ExitHeads, the folder they were saved to, or a dict of settings "
                "(heads, thresholds, criterion)")

    def __post_init__(self) -> None:
        heads = self.heads
        if isinstance(heads, (str, Path)):
            heads = load_heads(heads)
        if not isinstance(heads, ExitHeads):
            raise TypeError(f"EarlyExit: heads must be an accel.early_exit.ExitHeads or the folder they were saved "
                            f"to; got {type(heads).__name__}")
        criterion = check_choice("EarlyExit", "criterion", heads.criterion if self.criterion is None else self.criterion,
                                 CRITERIA)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "criterion", criterion)
        object.__setattr__(self, "thresholds", self._resolve_thresholds(heads, criterion))

    def _resolve_thresholds(self, heads: ExitHeads, criterion: str) -> Tuple[float, ...]:
        count = len(heads.blocks)
        value = self.thresholds
        if value is None:
            if heads.thresholds is None or heads.criterion != criterion:
                raise ValueError(
                    f"EarlyExit: thresholds not given and the heads carry none calibrated for criterion={criterion!r}; "
                    "pass thresholds= (one per exit) or run accel.early_exit.calibrate first"
                )
            value = heads.thresholds
        if is_real(value):
            value = [value] * count
        if not isinstance(value, (list, tuple)) or not all(is_real(v) for v in value):
            raise TypeError(f"EarlyExit: thresholds must be a float or {count} floats (one per exit); "
                            f"got {type(self.thresholds).__name__}")
        if len(value) != count:
            raise ValueError(f"EarlyExit: thresholds needs {count} values (one per exit, blocks {heads.blocks}); "
                             f"got {len(value)}")
        if any(math.isnan(v) for v in value):
            raise ValueError(f"EarlyExit: thresholds must not be NaN; got {list(value)}")
        return tuple(float(v) for v in value)

    @classmethod
    def never(cls, heads: Union[ExitHeads, str, Path], criterion: str = "max_prob") -> "EarlyExit":
        """Thresholds no image passes: outputs equal the unpatched model (the identity setting)."""
        criterion = check_choice("EarlyExit", "criterion", criterion, CRITERIA)
        return cls(heads=heads, thresholds=NEVER[criterion], criterion=criterion)

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``ExitHeads`` or the folder they were saved to -> those heads with their calibrated settings."""
        return {"heads": value} if isinstance(value, (ExitHeads, str, Path)) else None
