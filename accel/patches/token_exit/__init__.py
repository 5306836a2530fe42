"""Token exit: tokens whose update became small stop being updated (after SACT, Figurnov et al. 2017).

    accel.patch(vit, token_exit=0.05)           # relative residual norm threshold
    logits = vit(images)
    accel.token_exit.depth_map(vit)             # [B, H_patches, W_patches]: blocks each patch ran

Training-free; ``threshold=0`` is the unpatched model. See ``docs/token_exit.md``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..registry import Method, require_patch
from .config import TokenExit
from .frozen import active_first, exits, relative_update
from .timm import TokenExitTimm

METHOD = Method("token_exit", TokenExit, (TokenExitTimm,), decides_tokens=True, package=__name__)

__all__ = ["METHOD", "TokenExit", "depth_map", "relative_update", "active_first", "exits"]


def depth_map(model: Any) -> torch.Tensor:
    """For the last call of a model patched with ``token_exit``: the number of blocks that updated
    each patch, ``[B, H_patches, W_patches]`` (the model's depth where a patch never stopped)."""
    return require_patch(model, "token_exit", "token_exit.depth_map").depth_map()
