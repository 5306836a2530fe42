"""ToMe adapter for timm ``VisionTransformer``: merge between attention and MLP in every block.

Each block's forward is replaced (through ``accel.hooks``) by the same block computed with
timm's own submodules (norms, LayerScale, drop-path, qk-norm, MLP), with three changes from
the paper: attention adds log(size) to every key's logits (proportional attention, through
``accel.kernels.biased_attention``), it also returns the head-averaged keys as the matching metric, and
``r`` tokens are merged by size-weighted average after the attention residual. Blocks that
neither merge nor need the size bias run timm's original forward untouched.

Prefix tokens (``model.num_prefix_tokens``: CLS, distillation, registers) are never merged and
stay first, so timm's pooling and heads find them where they expect. ``pool`` is hooked so that
``global_pool='avg'``/``'avgmax'`` average by size. ``forward_features`` returns the merged
tokens ``[B, N', C]`` with ``N' <= N``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ...kernels import biased_attention, bipartite_merge
from ..base import in_backward
from ..vit_block import (TimmViTPatch, attn_residual, hook_blocks, intermediates_as_tokens, merge_heads,
                         mlp_residual, split_heads)
from .config import ToMe
from .merge import bipartite_soft_matching, initial_source, merge_source, merge_weighted

__all__ = ["ToMeTimm", "ToMeState", "attention_with_size"]


class ToMeState:
    """Per-call state of one patched model; reset when block 0 starts a forward pass."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.size: Optional[torch.Tensor] = None  # [B, N, 1] patches each token stands for
        self.source: Optional[torch.Tensor] = None  # [B, N, N_in] when tracing
        # block -> (size, source) entering it, kept while gradients are on: what a gradient
        # checkpointing recomputation of that block must see again
        self.entries: Dict[int, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        self.tokens_in: List[int] = []
        self.merged: List[int] = []


def attention_with_size(attn: Any, x: torch.Tensor, size: Optional[torch.Tensor]):
    """timm ``Attention`` on ``x: [B, N, C]`` with log(size) added to the logits.

    Returns the attention output ``[B, N, C]`` and the metric ``[B, N, head_dim]``: keys (after
    qk-norm) averaged over heads, as in the paper (Sec. 3, "Token Similarity").
    """
    q, k, v, gate = split_heads(attn, x)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if size is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:
        out = biased_attention(q, k, v, size.log()[..., 0], dropout_p=dropout_p)  # a log-size bias per key
    return merge_heads(attn, out, gate), k.mean(dim=1)


class ToMeTimm(TimmViTPatch):
    method = "tome"

    def __init__(self, model: Any, config: ToMe) -> None:
        super().__init__(model, config)
        if getattr(model, "attn_pool", None) is not None:
            raise TypeError(
                f"tome: {self.name} pools with an attention head (global_pool={model.global_pool!r}), which "
                f"ToMe cannot serve correctly; supported: {self.SUPPORTED} with global_pool token/avg/avgmax/max/''"
            )
        config.check_for_vit()
        self.schedule = config.per_block_r(len(self.blocks))

    @classmethod
    def tune_values(cls, obj: Any) -> Tuple[Any, ...]:
        """r at a quarter, half, three quarters and all of patches/depth: ViT-B/16 (196 patches, 12
        blocks) gets 4, 8, 12, 16, the range of the ToMe paper's Fig. 4."""
        per_block = obj.patch_embed.num_patches / len(obj.blocks)
        return tuple(sorted({max(1, round(f * per_block)) for f in (0.25, 0.5, 0.75, 1.0)}))

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = ToMeState()
        hook_blocks(self, self._block_forward, lambda i: f"merge r={self.schedule[i]}")
        if callable(getattr(self.target, "pool", None)):
            self.hooks.add(self.target, self._pool, "pool")
            self.patched_modules["pool"] = "size-weighted average"
        if callable(getattr(self.target, "forward_intermediates", None)):
            self.hooks.add(self.target, self._forward_intermediates, "forward_intermediates")

    # -- hooks ----------------------------------------------------------------------------------
    def _block_forward(self, index: int, block: Any, call_next: Any, x: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        state = self.state
        if in_backward():  # gradient checkpointing recomputes this block: its own entry state, no report
            size, source = state.entries[index]
            return self._block(index, block, call_next, x, attn_mask, is_causal, size, source)[0]
        if index == 0:
            state.reset()
        if self.config.trace_source and state.source is None:
            state.source = initial_source(x.shape[0], x.shape[1], x.device, x.dtype)
        if torch.is_grad_enabled():
            state.entries[index] = (state.size, state.source)
        out, state.size, state.source, r = self._block(index, block, call_next, x, attn_mask, is_causal,
                                                       state.size, state.source)
        if not torch.compiler.is_compiling():
            state.tokens_in.append(x.shape[1])
            state.merged.append(r)
        return out

    def _block(self, index: int, block: Any, call_next: Any, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
               is_causal: bool, size: Optional[torch.Tensor], source: Optional[torch.Tensor]):
        """Block ``index`` on ``x: [B, N, C]`` whose tokens have ``size``/``source``: the output and the
        merged tokens' size and source, and the number merged."""
        n = x.shape[1]
        r = max(0, min(self.schedule[index], (n - self.num_prefix) // 2))
        if r == 0 and (size is None or not self.config.prop_attn):
            # nothing to merge and no size bias: timm's own forward, masks and all
            return call_next(x, attn_mask=attn_mask, is_causal=is_causal), size, source, r
        if attn_mask is not None or is_causal:
            raise ValueError("tome: attn_mask/is_causal cannot be combined with token merging (r > 0); unpatch first")
        post_norm = self.post_norm[index]
        attn_out, metric = attention_with_size(block.attn, x if post_norm else block.norm1(x),
                                               size if self.config.prop_attn else None)
        x = attn_residual(block, post_norm, x, attn_out)
        if r > 0 and source is None:  # matching and merging with the indices kept on the device
            x, size = bipartite_merge(x, size, metric, r, self.num_prefix)
        elif r > 0:  # tracing sources needs the matching itself
            match = bipartite_soft_matching(metric, r, protected=self.num_prefix)
            x, size = merge_weighted(match, x, size)
            source = merge_source(match, source)
        return mlp_residual(block, post_norm, x), size, source, r

    def _pool(self, model: Any, call_next: Any, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        size = self.state.size
        kind = model.global_pool if pool_type is None else pool_type
        if size is None or kind not in ("avg", "avgmax") or size.shape[:2] != x.shape[:2]:
            return call_next(x, pool_type=pool_type)
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        tokens, weights = x[:, start:], size[:, start:].to(x.dtype)
        mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return mean if kind == "avg" else 0.5 * (tokens.amax(dim=1) + mean)

    def _forward_intermediates(self, model: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        return intermediates_as_tokens("tome", any(self.schedule), call_next, *args, **kwargs)

    # -- reporting ------------------------------------------------------------------------------
    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or not state.tokens_in:
            return None
        return {
            "tokens_in": list(state.tokens_in),
            "merged": list(state.merged),
            "tokens_out": state.tokens_in[-1] - state.merged[-1],
        }
