"""Settings of TokenExit and the shorthand values ``accel.patch(..., token_exit=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TokenExit"]


@dataclass(frozen=True)
class TokenExit:
    """UNDER CONSTRUCTION."""

    @classmethod
    def coerce(cls, value: Any) -> "TokenExit":
        if isinstance(value, cls):
            return value
        raise NotImplementedError("token_exit: under construction")
