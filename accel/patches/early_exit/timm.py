"""EarlyExit adapter for timm ``VisionTransformer``: images leave the batch at the first exit head
confident enough, the rest go on with a smaller batch.

``model.forward`` is hooked (through ``accel.hooks``) and runs timm's own pieces in timm's order
(``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, each block, ``norm``,
``forward_head``), but the blocks one at a time: after each exit block the exit head scores the
batch, images that pass their threshold leave with that head's logits, and the others are
packed into a smaller batch for the next block (``accel.kernels.compaction``, Triton on CUDA).
Logits are gathered back into the input order.
No image exiting means the same calls on the same batch as the unpatched model: bit-exact.

Behaviour beyond the exit rule itself:
- ``forward_features``/``forward_head`` called directly are not hooked: full depth, unchanged.
- In training mode (``model.train()``) ``forward`` passes through unchanged (full depth): early
  exit is an inference method; the heads are trained by ``accel.early_exit.fit_heads``.
- ``attn_mask``/``is_causal`` are refused (a mask would have to follow the shrinking batch).
- The batch size after each exit depends on the data: one host sync per exit block, and
  ``torch.compile`` breaks the graph there (``dynamic=True`` avoids recompiling per batch size).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...kernels import compact_tokens, gather_tokens
from ..base import config_dict
from ..vit_block import TimmViTPatch
from .config import EarlyExit
from .heads import ExitHeads
from .policy import exit_mask

__all__ = ["EarlyExitTimm", "EarlyExitState", "embed_tokens", "backbone_exits"]


def embed_tokens(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> tokens entering block 0 ``[B, N, D]``, as timm's ``forward_features``."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def backbone_exits(model: Any, x: torch.Tensor, heads: ExitHeads) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The whole backbone on ``x``: pooled features at each exit block (K x ``[B, D]``, the heads'
    pooling) and the final logits ``[B, classes]``. For training and calibrating heads."""
    tokens = embed_tokens(model, x)
    wanted, pooled = set(heads.blocks), []
    for i, blk in enumerate(model.blocks):
        tokens = blk(tokens)
        if i in wanted:
            pooled.append(heads.pool_tokens(tokens))
    return pooled, model.forward_head(model.norm(tokens))


class EarlyExitState:
    """Per-call state of one patched model; reset at the start of every forward."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batch = 0
        self.depth: Optional[torch.Tensor] = None  # [B] int64: blocks computed for each image
        self.exited: List[int] = []  # images leaving at each exit head, in exit order
        self.images_per_block: List[int] = []  # batch size entering each block


class EarlyExitTimm(TimmViTPatch):
    method = "early_exit"
    SUPPORTED = (
        "timm VisionTransformer models and subclasses that keep its forward_features (ViT, DeiT, distilled "
        "DeiT, DeiT-3, register-token and dynamic_img_size variants) with exit heads trained for them"
    )
    REBUILDS_BLOCKS = False  # blocks run as they are, one at a time

    def __init__(self, model: Any, config: EarlyExit) -> None:
        super().__init__(model, config)
        from timm.models.vision_transformer import VisionTransformer

        name, heads, blocks = self.name, config.heads, self.blocks
        if type(model).forward_features is not VisionTransformer.forward_features:
            raise TypeError(f"early_exit: {name} overrides forward_features, which early exit cannot follow "
                            f"block by block; supported: {self.SUPPORTED}")
        if heads.blocks[-1] >= len(blocks) - 1:
            raise ValueError(f"early_exit: heads exit after blocks {heads.blocks}, but {name} has {len(blocks)} blocks; "
                             f"exit blocks must be below {len(blocks) - 1} (after the last block the model's own head "
                             "decides)")
        if heads.dim != model.embed_dim or heads.num_classes != model.num_classes:
            raise ValueError(f"early_exit: heads are for width {heads.dim} and {heads.num_classes} classes; {name} has "
                             f"width {model.embed_dim} and {model.num_classes} classes")
        if heads.pool == "token" and getattr(model, "cls_token", None) is None:
            raise ValueError(f"early_exit: heads pool the CLS token, but {name} has none; train heads with pool='avg'")
        if heads.pool == "avg" and heads.num_prefix_tokens != model.num_prefix_tokens:
            raise ValueError(f"early_exit: heads skip {heads.num_prefix_tokens} prefix tokens when averaging; {name} "
                             f"has {model.num_prefix_tokens}")
        self.exit_at = {b: k for k, b in enumerate(heads.blocks)}  # block index -> exit position
        self._heads_cache: Dict[Tuple[torch.device, torch.dtype], ExitHeads] = {}

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = EarlyExitState()
        self._heads_cache = {}
        self.hooks.add(self.target, self._forward, "forward")
        self.patched_modules["forward"] = (f"blocks one by one, exits after blocks {self.config.heads.blocks} "
                                           f"({self.config.criterion})")

    def _heads_like(self, x: torch.Tensor) -> ExitHeads:
        """The heads on ``x``'s device and dtype: the user's module when it already is, else a
        converted copy made once (the user's heads are never moved)."""
        heads = self.config.heads
        param = next(heads.parameters())
        if param.device == x.device and param.dtype == x.dtype:
            return heads
        key = (x.device, x.dtype)
        if key not in self._heads_cache:
            self._heads_cache[key] = copy.deepcopy(heads).to(device=x.device, dtype=x.dtype).eval()
        return self._heads_cache[key]

    # -- the hook -------------------------------------------------------------------------------
    def _forward(self, model: Any, call_next: Any, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False) -> torch.Tensor:
        state = self.state
        state.reset()
        if model.training:
            return call_next(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("early_exit: attn_mask/is_causal cannot be combined with early exit; unpatch first")
        tokens = embed_tokens(model, x)
        batch = tokens.shape[0]
        heads = self._heads_like(tokens)
        thresholds, criterion = self.config.thresholds, self.config.criterion
        state.batch = batch
        state.depth = torch.full((batch,), len(model.blocks), dtype=torch.long, device=tokens.device)
        alive: Optional[torch.Tensor] = None  # input positions of the images still in the batch; None: all
        pieces: List[torch.Tensor] = []  # logits of the images that left, and their input positions
        where: List[torch.Tensor] = []
        for i, blk in enumerate(model.blocks):
            state.images_per_block.append(tokens.shape[0])
            tokens = blk(tokens)
            k = self.exit_at.get(i)
            if k is None:
                continue
            logits = heads(k, tokens)
            leave = exit_mask(logits, thresholds[k], criterion)
            n_leave = int(leave.sum())  # host sync: the batch shrinks by a data-dependent amount
            state.exited.append(n_leave)
            if n_leave == 0:
                continue
            # the leaving images' logits and the staying images' tokens, each packed in input order;
            # with n_leave known, packing reads nothing more back to the host
            left, out_idx = compact_tokens(logits[None], leave[None], n_leave)
            size = tokens.shape
            stay, stay_idx = compact_tokens(tokens.reshape(1, size[0], -1), ~leave[None], size[0] - n_leave)
            gone = out_idx if alive is None else alive[out_idx]
            pieces.append(left)
            where.append(gone)
            state.depth[gone] = i + 1
            alive = stay_idx if alive is None else alive[stay_idx]
            tokens = stay.view(-1, *size[1:])
            if tokens.shape[0] == 0:
                break
        if alive is None:  # nobody left early: the unpatched computation, returned as is
            return model.forward_head(model.norm(tokens))
        if tokens.shape[0] > 0:
            pieces.append(model.forward_head(model.norm(tokens)))
            where.append(alive)
        positions = torch.cat(where)
        return gather_tokens(torch.cat(pieces)[None], torch.argsort(positions)[None])[0]  # back to the input order

    # -- reporting ------------------------------------------------------------------------------
    def exit_depths(self) -> Optional[torch.Tensor]:
        """``[B]`` int64 blocks computed per image in the last call (None before one)."""
        return None if self.state is None else self.state.depth

    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or not state.images_per_block:
            return None
        left = state.batch - sum(state.exited)
        return {
            "batch": state.batch,
            "exit_blocks": list(self.config.heads.blocks),
            "exited": state.exited + [0] * (len(self.exit_at) - len(state.exited)),  # 0 past an empty batch
            "final": left,
            "images_per_block": list(state.images_per_block),
            "mean_depth": sum(state.images_per_block) / state.batch if state.batch else 0.0,
        }

    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        settings = config_dict(self.config)
        settings["heads"] = {k: v for k, v in self.config.heads.settings().items() if k != "metrics"}
        info["settings"] = settings
        return info
