"""Token exit: tokens whose update became small stop being updated (after SACT, Figurnov et al. 2017).

UNDER CONSTRUCTION: skeleton, filled in by its owner."""
from __future__ import annotations

from .config import TokenExit

__all__ = ["TokenExit"]
