"""Early exit per image: exit heads after chosen blocks, confidence thresholds.

UNDER CONSTRUCTION: skeleton, filled in by its owner."""
from __future__ import annotations

from .config import EarlyExit

__all__ = ["EarlyExit"]
