"""TokenExit adapter for timm ``VisionTransformer``: per-token early exit with real removal.

Every block's forward is hooked (through ``accel.hooks``). While every token is active a block
runs timm's own forward; once some have stopped, the block is computed from timm's submodules
(``accel.patches.vit_block``) on the active tokens only:

- keys and values come from all tokens (a stopped token's frozen state is projected with this
  block's weights, which no cache across blocks could provide);
- queries, the attention output projection, the residuals and the MLP run on the active tokens,
  packed across the batch (``[1, M, C]``); only the attention kernel sees queries padded per image
  to the batch's largest active count, and those padded rows are discarded;
- the result is scattered back, so stopped tokens keep their frozen state up to the final norm
  and head (any pooling works unchanged).

Which tokens stop depends on the input: each block reads the active counts back to the host once
(the total and the largest per image, together) for its shapes, so ``torch.compile`` needs
``dynamic=True`` (or expect recompiles). The gathers, packing and scatter-back go through
``accel.kernels.compaction`` (Triton on CUDA), given those counts: no further sync.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import compact_tokens, gather_tokens, scatter_tokens
from ..avit.halting import halting_score
from ..base import in_backward
from ..vit_block import TimmViTPatch, attn_residual, hook_blocks, merge_heads, mlp_residual, patch_grid, split_heads
from .config import TokenExit
from .frozen import active_first, exits, relative_update

__all__ = ["TokenExitTimm", "TokenExitState"]


class TokenExitState:
    """Per-call state of one patched model; reset when block 0 starts a forward pass."""

    def __init__(self) -> None:
        self.grid: Optional[Tuple[int, int]] = None  # patch grid of the current call (from patch_embed)
        self.reset()

    def reset(self) -> None:
        self.active: Optional[torch.Tensor] = None  # [B, N] bool, True = still updated
        self.depth: Optional[torch.Tensor] = None  # [B, N - prefix] blocks that updated each patch
        self.cumulative: Optional[torch.Tensor] = None  # [B, N] float32 halting scores so far
        self.queries: List[int] = []  # per block: tokens entering attention queries (= the MLP)
        self.tokens: List[int] = []  # per block: all tokens (B * N)
        # block -> active tokens entering it, kept while gradients are on: what a gradient
        # checkpointing recomputation of that block must see again
        self.entries: Dict[int, torch.Tensor] = {}


def split_projections(attn: Any, h_query: torch.Tensor, h_all: torch.Tensor):
    """timm ``Attention``'s projections with queries from ``h_query: [B, Q, C]`` only and keys and
    values from ``h_all: [B, N, C]``: ``q: [B, H, Q, d]``, ``k, v: [B, H, N, d]``, gate of the queries."""
    if type(attn.qkv) is not nn.Linear:  # unknown projection: project everything, use what is needed
        q, _, _, gate = split_heads(attn, h_query)
        _, k, v, _ = split_heads(attn, h_all)
        return q, k, v, gate
    dim, heads, head_dim = attn.num_heads * attn.head_dim, attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    gate = attn.gate(h_query).sigmoid() if getattr(attn, "gate", None) is not None else None
    q = F.linear(h_query, weight[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h_all, weight[dim:], None if bias is None else bias[dim:])
    batch, n, _ = h_all.shape
    q = q.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, gate


class TokenExitTimm(TimmViTPatch):
    method = "token_exit"

    def __init__(self, model: Any, config: TokenExit) -> None:
        super().__init__(model, config)
        if config.min_depth > len(self.blocks):
            raise ValueError(
                f"token_exit: min_depth={config.min_depth} exceeds the model's {len(self.blocks)} blocks"
            )

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = TokenExitState()
        hook_blocks(self, self._block_forward, lambda i: f"active tokens only; exit below {self.config.threshold:g}")
        self.hooks.add(self.target.patch_embed, self._patch_embed)
        self.patched_modules["patch_embed"] = "record the patch grid"

    # -- hooks ----------------------------------------------------------------------------------
    def _patch_embed(self, module: Any, call_next: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.state.grid = patch_grid(self.target, x)
        return call_next(x, *args, **kwargs)

    def _block_forward(self, index: int, block: Any, call_next: Any, x: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        state = self.state
        batch, n, _ = x.shape
        if in_backward():  # gradient checkpointing recomputes this block: its own entry state, no report
            return self._block(index, block, call_next, x, attn_mask, is_causal, state.entries[index])[0]
        if index == 0 or state.active is None or state.active.shape != (batch, n):
            state.reset()
            state.active = torch.ones(batch, n, dtype=torch.bool, device=x.device)
            state.depth = torch.full((batch, n - self.num_prefix), len(self.blocks), dtype=torch.long,
                                     device=x.device)
            state.cumulative = torch.zeros(batch, n, device=x.device)
        active = state.active
        if torch.is_grad_enabled():
            state.entries[index] = active
        out, count = self._block(index, block, call_next, x, attn_mask, is_causal, active)
        state.queries.append(count)
        state.tokens.append(batch * n)
        depth, config = index + 1, self.config
        if depth < len(self.blocks) and not config.never_exits():
            with torch.no_grad():  # a decision, not part of the gradient (nor of a checkpoint's saved tensors)
                self._update_exits(index, x, out, active)
        return out

    def _update_exits(self, index: int, x: torch.Tensor, out: torch.Tensor, active: torch.Tensor) -> None:
        """Which tokens stop after block ``index`` (input ``x``, output ``out``)."""
        state, depth, config = self.state, index + 1, self.config
        halted = None
        if config.halting:  # A-ViT's cumulative halting score (Sec. 3), accumulated from block 1
            score = halting_score(out, config.gamma, config.beta)
            state.cumulative = state.cumulative + torch.where(active, score, torch.zeros_like(score))
            halted = state.cumulative >= 1.0 - config.eps
        if depth >= config.min_depth:
            # SACT-style halting without a trained halting unit: stop when the block barely
            # moved the token (relative residual norm under the threshold).
            stop = exits(active, relative_update(out, x), config.threshold, self.num_prefix, halted)
            state.depth = torch.where(stop[:, self.num_prefix:], depth, state.depth)
            state.active = active & ~stop

    def _block(self, index: int, block: Any, call_next: Any, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
               is_causal: bool, active: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Block ``index`` on ``x: [B, N, C]`` with ``active: [B, N]`` tokens updated: the output and
        the number of tokens that were queries."""
        # The one host sync of a block: the shapes below depend on how many tokens are active (in
        # all, M, and in the fullest image, Q); both are read at once.
        counts = active.sum(dim=1)
        longest, total = torch.stack([counts.max(), counts.sum()]).tolist()
        if total == active.numel():  # nothing stopped yet: timm's own forward, masks and all
            return call_next(x, attn_mask=attn_mask, is_causal=is_causal), total
        if attn_mask is not None or is_causal:
            raise ValueError("token_exit: attn_mask/is_causal cannot be combined with stopped tokens; unpatch first")
        return self._active_block(block, self.post_norm[index], x, active, longest, total)

    def _active_block(self, block: Any, post_norm: bool, x: torch.Tensor, active: torch.Tensor, longest: int,
                      total: int):
        """The block on the ``total`` active tokens of ``x: [B, N, C]`` (at most ``longest`` in an
        image); stopped ones are keys/values only."""
        attn = block.attn
        batch, n, channels = x.shape
        h = x if post_norm else block.norm1(x)
        order, valid = active_first(active, longest)  # [B, Q]
        h_query = gather_tokens(h, order)
        q, k, v, gate = split_projections(attn, h_query, h)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        heads, head_dim = out.shape[1], out.shape[3]
        out = compact_tokens(out.transpose(1, 2).reshape(batch, longest, heads * head_dim), valid, total)[0]
        out = out.view(1, total, heads, head_dim).transpose(1, 2)  # packed: [1, H, M, d]
        attn_out = merge_heads(attn, out, None if gate is None else compact_tokens(gate, valid, total)[0][None])
        packed, where = compact_tokens(x, active, total)  # [M, C] and their flat positions b * N + n
        packed = attn_residual(block, post_norm, packed[None], attn_out)  # [1, M, C]
        packed = mlp_residual(block, post_norm, packed)
        result = scatter_tokens(x.reshape(1, batch * n, channels), where[None], packed)
        return result.view(batch, n, channels), total

    # -- reporting ------------------------------------------------------------------------------
    def depth_map(self) -> torch.Tensor:
        """Blocks that updated each patch in the last call, ``[B, H_patches, W_patches]``."""
        state = self.state
        if state is None or state.depth is None:
            raise RuntimeError("token_exit: no call yet; run the model once, then ask for the depth map")
        batch, patches = state.depth.shape
        grid = state.grid
        if grid is None or grid[0] * grid[1] != patches:
            raise RuntimeError(f"token_exit: the {patches} patch tokens of the last call do not form the "
                               f"patch grid {grid} (patch dropout?); no depth map")
        return state.depth.reshape(batch, grid[0], grid[1])

    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or not state.queries:
            return None
        depth = state.depth.float()
        return {
            "active_tokens": list(state.queries),  # entering each block's attention queries and MLP
            "tokens": list(state.tokens),
            "mean_depth": float(depth.mean()) if depth.numel() else float(len(self.blocks)),
            "blocks": len(self.blocks),
        }
