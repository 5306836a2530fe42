"""Settings of Token Merging and the shorthand values ``accel.patch(..., tome=...)`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Tuple, Union

__all__ = ["ToMe"]

RSpec = Union[int, Tuple[int, ...]]

MODES = ("merge", "downsample")
DOWNSAMPLE_METHODS = ("nearest", "avg")
MAX_DOWNSAMPLE = (1, 2, 4, 8)
VIT_ONLY = ("r", "inflect", "prop_attn", "trace_source")


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

    Diffusion settings (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", 2023; ToDo,
    Smith et al. 2024), refused for ViTs:

    ratio: fraction of the tokens of a block merged away (``mode="merge"``).
    max_downsample: merge in blocks whose latent is downsampled at most this much (1, 2, 4 or 8);
        None: the highest resolution that has attention blocks.
    sx, sy: one destination token per ``sx x sy`` window of the latent grid (paper, Sec. 4.1).
    use_rand: pick the destination at random inside each window (paper's default), from a generator
        seeded with ``seed`` and kept apart from the pipeline's noise; odd batches use the window's
        top-left token, as the paper's implementation did.
    merge_attn, merge_crossattn, merge_mlp: merge around self-attention, cross-attention, the MLP.
    mode: "merge" (ToMe: merge, op, unmerge) or "downsample" (ToDo: queries stay, keys and values
        of self-attention come from the latent grid subsampled by ``downsample_factor``).
    downsample_method: "nearest" (a regular subsample, default) or "avg" (window mean).
    """

    r: Optional[RSpec] = None
    ratio: Optional[float] = None
    inflect: float = 0.0
    prop_attn: bool = True
    trace_source: bool = False
    max_downsample: Optional[int] = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    mode: str = "merge"
    downsample_factor: int = 2
    downsample_method: str = "nearest"

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
        for name in ("prop_attn", "trace_source", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ToMe: {name} must be a bool; got {type(getattr(self, name)).__name__}")
        self._check_diffusion_settings()

    def _check_diffusion_settings(self) -> None:
        for name, allowed in (("mode", MODES), ("downsample_method", DOWNSAMPLE_METHODS)):
            value = getattr(self, name)
            options = ", ".join(map(repr, allowed))
            if not isinstance(value, str):
                raise TypeError(f"ToMe: {name} must be one of {options}; got {type(value).__name__}")
            if value not in allowed:
                raise ValueError(f"ToMe: {name} must be one of {options}; got {value!r}")
        for name, low in (("sx", 1), ("sy", 1), ("downsample_factor", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"ToMe: {name} must be an int >= {low}; got {type(value).__name__}")
            if value < low:
                raise ValueError(f"ToMe: {name} must be an int >= {low}; got {value}")
        if self.max_downsample is not None:
            if not _is_int(self.max_downsample):
                raise TypeError(f"ToMe: max_downsample must be one of 1, 2, 4, 8 or None; "
                                f"got {type(self.max_downsample).__name__}")
            if self.max_downsample not in MAX_DOWNSAMPLE:
                raise ValueError(f"ToMe: max_downsample must be one of 1, 2, 4, 8 or None; got {self.max_downsample}")
        if self.mode == "downsample":
            given = [n for n in ("ratio", "merge_crossattn", "merge_mlp") if getattr(self, n) != _default(n)]
            if given:
                raise ValueError(f"ToMe: {', '.join(given)} applies to mode='merge', not mode='downsample' "
                                 "(which only shrinks the keys/values of self-attention by downsample_factor)")
        else:
            given = [n for n in ("downsample_factor", "downsample_method") if getattr(self, n) != _default(n)]
            if given:
                raise ValueError(f"ToMe: {', '.join(given)} applies to mode='downsample'; got mode='merge'")

    def diffusion_settings_given(self) -> List[str]:
        """Names of the diffusion-only settings that differ from their defaults."""
        start = [f.name for f in fields(self)].index("max_downsample")
        return [f.name for f in fields(self)[start:] if getattr(self, f.name) != f.default] + (
            ["ratio"] if self.ratio is not None else [])

    def check_for_diffusion(self, model_name: str) -> None:
        """ValueError unless these settings make sense for a diffusion model."""
        vit_only = [n for n in VIT_ONLY if getattr(self, n) != _default(n)]
        if vit_only:
            raise ValueError(
                f"ToMe: {', '.join(vit_only)} {'is a' if len(vit_only) == 1 else 'are'} timm ViT setting(s); "
                f"{model_name} is a diffusion model: give ratio (fraction of tokens merged), e.g. tome=0.5"
            )
        if self.mode == "merge" and self.ratio is None:
            raise ValueError(f"ToMe: {model_name} needs ratio (fraction of tokens merged), e.g. tome=0.5, "
                             "or mode='downsample'")
        if self.mode == "merge" and not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("ToMe: merge_attn, merge_crossattn and merge_mlp are all False: nothing would merge")

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
        diffusion = self.diffusion_settings_given()
        if diffusion:
            raise ValueError(f"ToMe: {', '.join(diffusion)} {'is a' if len(diffusion) == 1 else 'are'} diffusion "
                             "setting(s), not used by timm ViTs (which take r, inflect, prop_attn, trace_source)")
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


def _default(name: str) -> Any:
    return ToMe.__dataclass_fields__[name].default
