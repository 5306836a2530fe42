"""Token Merging: the matching algorithms (``merge`` for ViTs, ``merge2d`` for diffusion latents), its
settings and per-framework adapters (``timm``, ``diffusers``).

Reachable as ``accel.tome``: ``accel.tome.get_source(model)`` returns what each output token
stands for after a call with ``ToMe(trace_source=True)``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..registry import Method, require_patch
from .config import ToMe
from .diffusers import ToMeDiffusers
from .merge import BipartiteMatch, bipartite_soft_matching, merge_source, merge_weighted
from .merge2d import GridMatch, bipartite_soft_matching_random2d, downsample_tokens
from .timm import ToMeTimm

METHOD = Method("tome", ToMe, (ToMeTimm, ToMeDiffusers), decides_tokens=True, package=__name__)

__all__ = [
    "METHOD",
    "ToMe",
    "BipartiteMatch",
    "bipartite_soft_matching",
    "merge_weighted",
    "merge_source",
    "GridMatch",
    "bipartite_soft_matching_random2d",
    "downsample_tokens",
    "get_source",
    "patch_groups",
]


def get_source(model: Any) -> Optional[torch.Tensor]:
    """``[B, N_out, N_in]`` 0/1 matrix of the last call: which input tokens each output token
    stands for (prefix tokens included). Needs ``ToMe(trace_source=True)``."""
    patch = require_patch(model, "tome", "tome.get_source")
    if not patch.config.trace_source:
        raise ValueError("tome: source tracing is off; patch with accel.ToMe(r=..., trace_source=True)")
    return None if patch.state is None else patch.state.source


def patch_groups(model: Any) -> Optional[torch.Tensor]:
    """``[B, N_in]`` int: for each input token, the index of the output token it merged into."""
    source = get_source(model)
    return None if source is None else source.argmax(dim=1)
