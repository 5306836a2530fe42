"""Settings of EViT and the shorthand values ``accel.patch(..., evit=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

__all__ = ["EViT", "default_locations"]

# The paper reorganises tokens in the 4th, 7th and 10th of DeiT's 12 blocks (Sec. 4.1): a
# quarter, half and three quarters of the way through. Other depths get the same fractions.
_PAPER_FRACTIONS = (0.25, 0.5, 0.75)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_locations(depth: int) -> Tuple[int, ...]:
    """0-based blocks that reduce tokens for a model of ``depth`` blocks: (3, 6, 9) for 12."""
    picked = sorted({min(depth - 1, int(round(depth * f))) for f in _PAPER_FRACTIONS})
    return tuple(i for i in picked if i >= 0)


@dataclass(frozen=True)
class EViT:
    """EViT token reorganisation (Liang et al., ICLR 2022), training-free.

    In each block of ``locations`` (0-based; None: the paper's 4th/7th/10th of 12, scaled to
    the model's depth), after the attention residual, the ``ceil(keep_rate * n)`` non-prefix
    tokens the CLS token attends to most (attention averaged over heads) are kept and the other
    ones are fused into one token, their CLS-attention-weighted average, appended after them
    (``fuse=False`` drops them instead). ``keep_rate=1.0`` keeps every token: the unpatched model.
    """

    keep_rate: float = 0.7
    locations: Optional[Tuple[int, ...]] = None
    fuse: bool = True

    def __post_init__(self) -> None:
        rate = self.keep_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"EViT: keep_rate must be a float in (0, 1]; got {type(rate).__name__}")
        if not (0.0 < float(rate) <= 1.0) or not math.isfinite(rate):
            raise ValueError(f"EViT: keep_rate must be in (0, 1] (fraction of tokens kept); got {rate}")
        object.__setattr__(self, "keep_rate", float(rate))
        locs = self.locations
        if locs is not None:
            if _is_int(locs):
                locs = (locs,)
            if not isinstance(locs, (tuple, list)) or not all(_is_int(i) for i in locs):
                raise TypeError(f"EViT: locations must be a list of 0-based block indices or None; got {locs!r}")
            if not locs or any(i < 0 for i in locs) or len(set(locs)) != len(locs):
                raise ValueError(
                    f"EViT: locations must be distinct non-negative block indices (at least one); got {list(locs)}"
                )
            object.__setattr__(self, "locations", tuple(sorted(int(i) for i in locs)))
        if not isinstance(self.fuse, bool):
            raise TypeError(f"EViT: fuse must be a bool; got {type(self.fuse).__name__}")

    def block_locations(self, depth: int) -> List[int]:
        """The reducing blocks of a ``depth``-block model (ValueError if one is out of range)."""
        if self.locations is None:
            return list(default_locations(depth))
        bad = [i for i in self.locations if i >= depth]
        if bad:
            raise ValueError(f"EViT: locations {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
        return list(self.locations)

    @classmethod
    def coerce(cls, value: Any) -> "EViT":
        """``evit=0.7`` -> EViT(keep_rate=0.7); a dict -> EViT(**dict)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            raise TypeError("evit: give a keep rate (float in (0, 1]) or accel.EViT(...), not a bool")
        if isinstance(value, (int, float)):
            return cls(keep_rate=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(
            "evit: expected accel.EViT(...), a float keep rate in (0, 1] or a dict of settings; "
            f"got {type(value).__name__}"
        )
