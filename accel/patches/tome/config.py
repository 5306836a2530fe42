"""Settings of Token Merging and the shorthand values ``accel.patch(..., tome=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from ..settings import (Settings, check_bool, check_choice, check_int, check_real, given_settings, is_int, is_real,
                        refuse_settings)

__all__ = ["ToMe"]

RSpec = Union[int, List[int], Tuple[int, float]]

MODES = ("merge", "downsample")
DOWNSAMPLE_METHODS = ("nearest", "avg")
MAX_DOWNSAMPLE = (1, 2, 4, 8)
VIT_SETTINGS = ("r", "inflect", "prop_attn", "trace_source")
DIFFUSION_SETTINGS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "seed", "merge_attn", "merge_crossattn",
                      "merge_mlp", "mode", "downsample_factor", "downsample_method")


@dataclass(frozen=True)
class ToMe(Settings):
    """Token Merging (Bolya et al., ICLR 2023).

    For timm ViTs, ``r`` is the number of tokens merged away in each block: an int (every
    block), a per-block list, or an int with ``inflect`` for a linear schedule that keeps the
    mean at ``r`` (``inflect > 0`` merges more in early blocks, the paper's "decreasing"
    schedule; a tuple is always ``(r, inflect)``, as in the original code, a list always
    per-block). In every
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

    METHOD = "tome"
    EXPECTED = ("an int r (tokens merged per block, timm ViTs), a float ratio (fraction merged, diffusion), "
                "a per-block list of r, an (r, inflect) tuple or a dict of settings")

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, tuple):  # always (r, inflect): the original code's schedule spelling
            if len(r) != 2 or not is_int(r[0]) or not is_real(r[1]):
                raise ValueError(f"ToMe: a tuple r is (r, inflect), e.g. (16, 0.5); got {r!r} "
                                 "(give a per-block schedule as a list)")
            if self.inflect:
                raise ValueError("ToMe: give the schedule either as r=(r, inflect) or as inflect=, not both")
            object.__setattr__(self, "inflect", r[1])
            r = r[0]
        if isinstance(r, list):
            if not r or not all(is_int(v) and v >= 0 for v in r):
                raise ValueError(f"ToMe: r as a per-block list must hold non-negative ints; got {r!r}")
            r = [int(v) for v in r]
        elif r is not None:
            r = check_int("ToMe", "r", r, None, "an int, a per-block list of ints, or (r, inflect)")
            if r < 0:
                raise ValueError(f"ToMe: r must be >= 0 (tokens merged per block); got {r}")
        object.__setattr__(self, "r", r)
        if self.ratio is not None:
            object.__setattr__(self, "ratio", check_real("ToMe", "ratio", self.ratio, lambda v: 0.0 <= v < 1.0,
                                                         "in [0, 1) (a float: fraction of tokens merged)"))
        inflect = check_real("ToMe", "inflect", self.inflect, lambda v: -1.0 <= v <= 1.0, "in [-1, 1] (a float)")
        if inflect and isinstance(r, list):
            raise ValueError("ToMe: inflect applies to an int r, not to a per-block list")
        object.__setattr__(self, "inflect", inflect)
        for name in ("prop_attn", "trace_source", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            object.__setattr__(self, name, check_bool("ToMe", name, getattr(self, name)))
        object.__setattr__(self, "mode", check_choice("ToMe", "mode", self.mode, MODES))
        object.__setattr__(self, "downsample_method",
                           check_choice("ToMe", "downsample_method", self.downsample_method, DOWNSAMPLE_METHODS))
        for name, low in (("sx", 1), ("sy", 1), ("downsample_factor", 1), ("seed", 0)):
            object.__setattr__(self, name, check_int("ToMe", name, getattr(self, name), low))
        if self.max_downsample is not None:
            object.__setattr__(self, "max_downsample",
                               check_choice("ToMe", "max_downsample", self.max_downsample, MAX_DOWNSAMPLE))
        if self.mode == "downsample":
            given = given_settings(self, ("ratio", "merge_crossattn", "merge_mlp"))
            if given:
                raise ValueError(f"ToMe: {', '.join(given)} applies to mode='merge', not mode='downsample' "
                                 "(which only shrinks the keys/values of self-attention by downsample_factor)")
        else:
            given = given_settings(self, ("downsample_factor", "downsample_method"))
            if given:
                raise ValueError(f"ToMe: {', '.join(given)} applies to mode='downsample'; got mode='merge'")

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``tome=16`` (or a per-block list, or ``(r, inflect)``) -> r; ``tome=0.5`` -> ratio."""
        if is_int(value) or isinstance(value, (list, tuple)):
            return {"r": value}
        if is_real(value):
            return {"ratio": value}
        return None

    def check_for_vit(self) -> None:
        """ValueError unless these settings make sense for a timm ViT."""
        if self.r is None:
            raise ValueError(
                "ToMe: timm ViTs need r (tokens merged per block), e.g. accel.patch(vit, tome=16); "
                f"ratio={self.ratio} is the diffusion setting"
            )
        refuse_settings(self, DIFFUSION_SETTINGS, "diffusion",
                        "timm ViTs take r, inflect, prop_attn, trace_source")

    def check_for_diffusion(self, model_name: str) -> None:
        """ValueError unless these settings make sense for a diffusion model."""
        refuse_settings(self, VIT_SETTINGS, "timm ViT",
                        f"{model_name} is a diffusion model: give ratio (fraction of tokens merged), e.g. tome=0.5")
        if self.mode == "merge" and self.ratio is None:
            raise ValueError(f"ToMe: {model_name} needs ratio (fraction of tokens merged), e.g. tome=0.5, "
                             "or mode='downsample'")
        if self.mode == "merge" and not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("ToMe: merge_attn, merge_crossattn and merge_mlp are all False: nothing would merge")

    def per_block_r(self, num_blocks: int) -> List[int]:
        """The number of tokens to merge in each of ``num_blocks`` blocks (before capping)."""
        if isinstance(self.r, list):
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
