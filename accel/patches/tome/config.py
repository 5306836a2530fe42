"""Settings of Token Merging and the shorthand values ``accel.patch(..., tome=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

__all__ = ["ToMe"]

RSpec = Union[int, Tuple[int, ...]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ToMe:
    """Token Merging (Bolya et al., ICLR 2023).

    For timm ViTs, ``r`` is the number of tokens merged away in each block: an int (every
    block), a per-block list, or an int with ``inflect`` for a linear schedule that keeps the
    mean at ``r`` (``inflect > 0`` merges more in early blocks, the paper's "decreasing"
    schedule; ``(r, inflect)`` is accepted as ``r`` too, as in the original code). In every
    block ``r`` is capped by the tokens available. ``ratio`` is the diffusion setting (fraction of
    tokens merged) used by diffusion adapters.

    prop_attn: add log(size) to attention logits so a merged token counts as many (Eq. 1 of the
        paper); switch it off for models trained without it at low r, such as MAE.
    trace_source: keep, for each output token, which input tokens it stands for
        (``accel.tome.get_source``).
    """

    r: Optional[RSpec] = None
    ratio: Optional[float] = None
    inflect: float = 0.0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, (tuple, list)) and len(r) == 2 and _is_int(r[0]) and isinstance(r[1], float):
            if self.inflect:
                raise ValueError("ToMe: give the schedule either as r=(r, inflect) or as inflect=, not both")
            object.__setattr__(self, "inflect", float(r[1]))
            r = r[0]
        if isinstance(r, (tuple, list)):
            if not r or not all(_is_int(v) and v >= 0 for v in r):
                raise ValueError(f"ToMe: r as a per-block list must hold non-negative ints; got {list(r)!r}")
            r = tuple(int(v) for v in r)
        elif r is not None and not _is_int(r):
            raise TypeError(
                "ToMe: r must be an int, a per-block list of ints, or (r, inflect); "
                f"got {type(r).__name__}"
            )
        elif r is not None and r < 0:
            raise ValueError(f"ToMe: r must be >= 0 (tokens merged per block); got {r}")
        object.__setattr__(self, "r", r)

        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ToMe: ratio must be a float in [0, 1); got {type(self.ratio).__name__}")
            if not 0.0 <= float(self.ratio) < 1.0:
                raise ValueError(f"ToMe: ratio must be in [0, 1); got {self.ratio}")
            object.__setattr__(self, "ratio", float(self.ratio))
        if isinstance(self.inflect, bool) or not isinstance(self.inflect, (int, float)):
            raise TypeError(f"ToMe: inflect must be a float in [-1, 1]; got {type(self.inflect).__name__}")
        if not -1.0 <= float(self.inflect) <= 1.0 or not math.isfinite(self.inflect):
            raise ValueError(f"ToMe: inflect must be in [-1, 1]; got {self.inflect}")
        if self.inflect and isinstance(self.r, tuple):
            raise ValueError("ToMe: inflect applies to an int r, not to a per-block list")
        object.__setattr__(self, "inflect", float(self.inflect))
        for name in ("prop_attn", "trace_source"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ToMe: {name} must be a bool; got {type(getattr(self, name)).__name__}")

    @classmethod
    def coerce(cls, value: Any) -> "ToMe":
        """``tome=16`` -> ToMe(r=16); ``tome=0.5`` -> ToMe(ratio=0.5); a list -> per-block r."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            raise TypeError("tome: give r (int), ratio (float) or accel.ToMe(...), not a bool")
        if _is_int(value) or isinstance(value, (list, tuple)):
            return cls(r=value)
        if isinstance(value, float):
            return cls(ratio=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(
            "tome: expected accel.ToMe(...), an int r, a float ratio, a per-block list or a dict "
            f"of settings; got {type(value).__name__}"
        )

    def per_block_r(self, num_blocks: int) -> List[int]:
        """The number of tokens to merge in each of ``num_blocks`` blocks (before capping)."""
        if self.r is None:
            raise ValueError(
                "ToMe: timm ViTs need r (tokens merged per block), e.g. accel.patch(vit, tome=16); "
                f"ratio={self.ratio} is the diffusion setting"
            )
        if isinstance(self.r, tuple):
            if len(self.r) != num_blocks:
                raise ValueError(
                    f"ToMe: r as a per-block list needs {num_blocks} entries (one per block); got {len(self.r)}"
                )
            return list(self.r)
        if not self.inflect or num_blocks == 1:
            return [self.r] * num_blocks
        # Linear from r*(1+inflect) down to r*(1-inflect): the mean stays r (ToMe paper, Sec. 4.1).
        hi, lo = self.r * (1.0 + self.inflect), self.r * (1.0 - self.inflect)
        step = (lo - hi) / (num_blocks - 1)
        return [max(0, int(round(hi + step * i))) for i in range(num_blocks)]
