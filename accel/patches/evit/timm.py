"""EViT adapter for timm ``VisionTransformer``: token reorganisation in a few chosen blocks.

Each reducing block's forward is replaced (through ``accel.hooks``) by the same block computed
with timm's own submodules (``accel.patches.vit_block``), plus one step between the attention
residual and the MLP (paper, Fig. 2): the CLS token's head-averaged attention ranks the
non-prefix tokens, the top ``ceil(keep_rate * n)`` stay and the rest are fused into one token.
The other blocks, and every block when nothing would be dropped, run timm's original forward.

Prefix tokens (CLS, registers, distillation token) always stay first. The model needs a CLS
token (its attention is the ranking) and token pooling (``global_pool='token'`` or ``''``): an
average over kept and fused tokens would not be the model's average any more. ``forward_features``
returns the reduced tokens ``[B, N', C]``; ``N'`` depends only on ``N`` and the settings, so
shapes stay static (no host sync).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..base import in_backward
from ..vit_block import (TimmViTPatch, attn_residual, hook_blocks, intermediates_as_tokens, merge_heads,
                         mlp_residual, split_heads)
from .config import EViT
from .keep import cls_attention, keep_and_fuse, num_kept

__all__ = ["EViTTimm", "EViTState"]


class EViTState:
    """Per-call state of one patched model; reset when block 0 starts a forward pass."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens_in: List[int] = []
        self.tokens_out: List[int] = []
        self.kept: Dict[int, torch.Tensor] = {}  # block -> [B, keep] positions kept in that block


class EViTTimm(TimmViTPatch):
    method = "evit"
    SUPPORTED = (
        "timm VisionTransformer models with a class token and token pooling (ViT, DeiT, distilled DeiT, "
        "DeiT-3, register-token variants) built from timm's Block/ResPostBlock and Attention"
    )

    @classmethod
    def tune_values(cls, obj: Any) -> Tuple[Any, ...]:
        return (0.9, 0.7, 0.5)  # keep rates; the EViT paper's DeiT-S runs use 0.5-0.9

    def __init__(self, model: Any, config: EViT) -> None:
        super().__init__(model, config)
        name = self.name
        if getattr(model, "cls_token", None) is None:
            raise TypeError(
                f"evit: {name} has no class token (class_token=False), and EViT ranks tokens by the class "
                f"token's attention; supported: {self.SUPPORTED}"
            )
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None or pool not in ("token", ""):
            raise TypeError(
                f"evit: {name} pools with global_pool={pool!r}; EViT fuses tokens, so only the class token "
                f"is the model's own output; supported: {self.SUPPORTED} (global_pool 'token' or '')"
            )
        self.locations = set(config.block_locations(len(self.blocks)))

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = EViTState()
        hook_blocks(self, self._block_forward,
                    lambda i: f"keep {self.config.keep_rate:g}" if i in self.locations else "count tokens")
        if callable(getattr(self.target, "forward_intermediates", None)):
            self.hooks.add(self.target, self._forward_intermediates, "forward_intermediates")

    # -- hooks ----------------------------------------------------------------------------------
    def _block_forward(self, index: int, block: Any, call_next: Any, x: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        # A block's computation depends only on its input; a gradient checkpointing recomputation
        # (in the backward pass) runs it again without touching the report of the forward pass.
        report = not in_backward() and not torch.compiler.is_compiling()
        state = self.state
        if index == 0 and report:
            state.reset()
        n = x.shape[1]
        candidates = n - self.num_prefix
        keep = num_kept(self.config.keep_rate, candidates) if index in self.locations and candidates > 0 else candidates
        if keep >= candidates:
            out = call_next(x, attn_mask=attn_mask, is_causal=is_causal)  # timm's own forward
        elif attn_mask is not None or is_causal:
            raise ValueError("evit: attn_mask/is_causal cannot be combined with token reduction; unpatch first")
        else:
            out, kept = self._reduce_block(block, self.post_norm[index], x, keep)
            if report:
                state.kept[index] = kept
        if report:
            state.tokens_in.append(n)
            state.tokens_out.append(out.shape[1])
        return out

    def _reduce_block(self, block: Any, post_norm: bool, x: torch.Tensor, keep: int):
        """The reducing block on ``x: [B, N, C]``: its output ``[B, N', C]`` and the kept positions."""
        attn = block.attn
        q, k, v, gate = split_heads(attn, x if post_norm else block.norm1(x))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        x = attn_residual(block, post_norm, x, merge_heads(attn, out, gate))
        # Reorganise between attention and MLP (paper, Sec. 3.2): the MLP sees the kept tokens only.
        x, kept = keep_and_fuse(x, cls_attention(q, k, attn.scale), keep, self.num_prefix, self.config.fuse)
        return mlp_residual(block, post_norm, x), kept

    def _forward_intermediates(self, model: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        return intermediates_as_tokens("evit", self.config.keep_rate < 1.0, call_next, *args, **kwargs)

    # -- reporting ------------------------------------------------------------------------------
    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or not state.tokens_in:
            return None
        return {
            "tokens_in": list(state.tokens_in),
            "tokens_out": list(state.tokens_out),
            "reduced_in": sorted(state.kept),
        }
