"""Settings of EarlyExit and the shorthand values ``accel.patch(..., early_exit=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["EarlyExit"]


@dataclass(frozen=True)
class EarlyExit:
    """UNDER CONSTRUCTION."""

    @classmethod
    def coerce(cls, value: Any) -> "EarlyExit":
        if isinstance(value, cls):
            return value
        raise NotImplementedError("early_exit: under construction")
