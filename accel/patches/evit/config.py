"""Settings of EViT and the shorthand values ``accel.patch(..., evit=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..settings import Settings, check_bool, check_real, is_int, is_real

__all__ = ["EViT", "default_locations"]

# The paper reorganises tokens in the 4th, 7th and 10th of DeiT's 12 blocks (Sec. 4.1): a
# quarter, half and three quarters of the way through. Other depths get the same fractions.
_PAPER_FRACTIONS = (0.25, 0.5, 0.75)


def default_locations(depth: int) -> Tuple[int, ...]:
    """0-based blocks that reduce tokens for a model of ``depth`` blocks: (3, 6, 9) for 12."""
    picked = sorted({min(depth - 1, int(round(depth * f))) for f in _PAPER_FRACTIONS})
    return tuple(i for i in picked if i >= 0)


@dataclass(frozen=True)
class EViT(Settings):
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

    METHOD = "evit"
    EXPECTED = "a float keep rate in (0, 1] or a dict of settings"

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_rate", check_real("EViT", "keep_rate", self.keep_rate,
                                                         lambda v: 0.0 < v <= 1.0,
                                                         "in (0, 1] (a float: fraction of tokens kept)"))
        locs = self.locations
        if locs is not None:
            if is_int(locs):
                locs = (locs,)
            if not isinstance(locs, (tuple, list)) or not all(is_int(i) for i in locs):
                raise TypeError(f"EViT: locations must be a list of 0-based block indices or None; got {locs!r}")
            if not locs or any(i < 0 for i in locs) or len(set(locs)) != len(locs):
                raise ValueError(
                    f"EViT: locations must be distinct non-negative block indices (at least one); got {list(locs)}"
                )
            object.__setattr__(self, "locations", tuple(sorted(int(i) for i in locs)))
        object.__setattr__(self, "fuse", check_bool("EViT", "fuse", self.fuse))

    def block_locations(self, depth: int) -> List[int]:
        """The reducing blocks of a ``depth``-block model (ValueError if one is out of range)."""
        if self.locations is None:
            return list(default_locations(depth))
        bad = [i for i in self.locations if i >= depth]
        if bad:
            raise ValueError(f"EViT: locations {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
        return list(self.locations)

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``evit=0.7`` -> EViT(keep_rate=0.7)."""
        return {"keep_rate": value} if is_real(value) else None
