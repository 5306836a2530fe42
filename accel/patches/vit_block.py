"""timm ViT blocks computed from their own submodules, for methods that change which tokens a
block sees (ToMe, A-ViT, EViT, token exit).

Every method that rewrites a block forward uses these pieces, so norms, LayerScale, drop-path,
qk-norm, attention gates and post-norm blocks are handled once and the same way everywhere.
Shapes: ``x: [B, N, C]``; per-head tensors ``[B, H, N, head_dim]``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..families import is_timm_vit, qualified_name
from .base import MethodPatch

__all__ = ["TimmViTPatch", "vit_blocks", "hook_blocks", "patch_grid", "is_post_norm", "intermediates_as_tokens", "split_heads", "merge_heads", "attention", "attn_residual",
           "mlp_residual", "block_forward"]


class TimmViTPatch(MethodPatch):
    """Base of the adapters for timm ``VisionTransformer``: the model's blocks (each checked to be
    timm's ``Block``/``ResPostBlock`` with timm's ``Attention`` when the method rebuilds blocks
    from their submodules), which are post-norm, and the prefix tokens (CLS, distillation,
    registers) that never take part in token reduction."""

    SUPPORTED = ("timm VisionTransformer models (ViT, DeiT, distilled DeiT, DeiT-3, register-token and "
                 "dynamic_img_size variants) built from timm's Block/ResPostBlock and Attention")
    REBUILDS_BLOCKS = True  # False: the method calls the blocks as they are (any block type)

    def __init__(self, model: Any, config: Any) -> None:
        super().__init__(model, config)
        self.name = qualified_name(model)
        if self.REBUILDS_BLOCKS:
            self.blocks = vit_blocks(model, self.method, self.SUPPORTED)
        else:
            self.blocks = list(getattr(model, "blocks", []))
            if not self.blocks:
                raise TypeError(f"{self.method}: matched no transformer block in {self.name} (model.blocks is empty)")
        self.post_norm = [is_post_norm(blk) for blk in self.blocks]
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return is_timm_vit(obj)


def vit_blocks(model: Any, method: str, supported: str) -> List[Any]:
    """``model.blocks`` as a list, each checked to be timm's ``Block``/``ResPostBlock`` with timm's
    ``Attention``; a ``TypeError`` naming the block and ``supported`` otherwise."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, ResPostBlock

    name = qualified_name(model)
    blocks = list(getattr(model, "blocks", []))
    if not blocks:
        raise TypeError(f"{method}: matched no transformer block in {name} (model.blocks is empty)")
    for i, blk in enumerate(blocks):
        if type(blk) not in (Block, ResPostBlock) or type(getattr(blk, "attn", None)) is not Attention:
            attn_name = type(getattr(blk, "attn", None)).__name__
            raise TypeError(
                f"{method}: {name}.blocks.{i} is {type(blk).__name__} with {attn_name} attention, which "
                f"{method} cannot serve correctly (rotary, parallel or custom blocks); supported: {supported}"
            )
    return blocks


def hook_blocks(patch: Any, forward: Callable[..., Any], describe: Callable[[int], str]) -> None:
    """Hook every block of ``patch.blocks`` with ``forward(index, block, call_next, ...)`` and
    report it in ``patch.patched_modules`` as ``blocks.<i>``: ``describe(i)``."""
    for i, blk in enumerate(patch.blocks):
        patch.hooks.add(blk, functools.partial(forward, i))
        patch.patched_modules[f"blocks.{i}"] = describe(i)


def patch_grid(model: Any, x: torch.Tensor) -> Optional[Tuple[int, int]]:
    """The patch grid ``(gh, gw)`` that ``model.patch_embed`` gives an image batch ``x: [B, C, H, W]``,
    or None (no patch embedding, or not an image batch)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or x.dim() != 4:
        return None
    if getattr(model, "dynamic_img_size", False) and callable(getattr(embed, "dynamic_feat_size", None)):
        return tuple(int(s) for s in embed.dynamic_feat_size(tuple(x.shape[-2:])))
    grid = getattr(embed, "grid_size", None)
    return None if grid is None else tuple(int(s) for s in grid)


def is_post_norm(block: Any) -> bool:
    """timm's ``ResPostBlock`` normalises after the residual branch instead of before it."""
    from timm.models.vision_transformer import ResPostBlock

    return type(block) is ResPostBlock


def intermediates_as_tokens(method: str, reduces: bool, call_next: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward_intermediates`` of a model whose blocks drop or merge tokens (``reduces``): the
    tokens no longer form a patch grid, so only ``output_fmt='NLC'`` can be served."""
    if reduces and kwargs.get("output_fmt", "NCHW") != "NLC":
        raise NotImplementedError(
            f"{method}: reduced tokens no longer form a grid, so forward_intermediates works only with "
            f"output_fmt='NLC' while {method} is patched (or unpatch first)"
        )
    return call_next(*args, **kwargs)


def split_heads(attn: Any, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """timm ``Attention``'s projections of ``x: [B, N, C]``: ``q, k, v: [B, H, N, head_dim]``
    (after qk-norm) and the output gate ``[B, N, attn_dim]`` (None for ungated attention)."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, gate


def merge_heads(attn: Any, out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """``out: [B, H, N, head_dim]`` -> timm ``Attention``'s output ``[B, N, C]`` (norm, gate, proj)."""
    batch, heads, n, head_dim = out.shape
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, heads * head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def attention(attn: Any, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm ``Attention`` on ``x: [B, N, C]`` with SDPA and an optional float/bool ``attn_mask``
    broadcastable to ``[B, H, N, N]``."""
    q, k, v, gate = split_heads(attn, x)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    return merge_heads(attn, out, gate)


def attn_residual(block: Any, post_norm: bool, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """``x`` plus the attention branch's output, with the block's LayerScale/drop-path or post-norm."""
    if post_norm:
        return x + block.drop_path1(block.norm1(attn_out))
    return x + block.drop_path1(block.ls1(attn_out))


def mlp_residual(block: Any, post_norm: bool, x: torch.Tensor) -> torch.Tensor:
    """``x`` plus the block's MLP branch."""
    if post_norm:
        return x + block.drop_path2(block.norm2(block.mlp(x)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def block_forward(block: Any, post_norm: bool, x: torch.Tensor,
                  attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole block on ``x: [B, N, C]`` with an optional attention mask."""
    attn_in = x if post_norm else block.norm1(x)
    x = attn_residual(block, post_norm, x, attention(block.attn, attn_in, attn_mask))
    return mlp_residual(block, post_norm, x)
