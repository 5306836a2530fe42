"""AViT adapter for timm ``VisionTransformer``: the block loop runs with A-ViT token halting.

``model.blocks`` (the ``nn.Sequential`` that ``forward_features`` calls) is hooked: the hook
runs the blocks itself, from each block's own submodules (``accel.patches.vit_block``), and
returns ``[B, N, C]`` in the original token order holding every token's halting-weighted output
state, so ``model.norm``, pooling and head run unchanged.

Two paths, same outputs (float tolerance):

- ``mode="mask"`` (and every call in training mode): static shapes; each block computes all
  tokens, halted ones are masked out of attention as keys (each query also sees itself, so a
  halted query never gets an empty row) and are not updated.
- ``mode="remove"``: halted tokens are gathered out. The active tokens of all images are packed
  into one ``[T, C]`` list, so norms, qkv, projection and MLP compute exactly the active tokens
  (no padding); only the attention core scatters them per image into ``[B, n_max]`` with
  ``n_max`` the largest active count in the batch and a key mask (no mask when all counts are
  equal). Packing, padding and unpadding go through ``accel.kernels.compaction`` (Triton on
  CUDA). Data-dependent shapes: one host sync per block (the active count of each image, which
  sizes the packed list and the padding); ``torch.compile`` needs ``dynamic=True`` (or use
  ``mode="mask"``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...kernels import biased_attention, compact_tokens, gather_tokens, scatter_tokens
from ..vit_block import (TimmViTPatch, attn_residual, block_forward, merge_heads, mlp_residual, patch_grid,
                         split_heads)
from .config import AViT
from .halting import HaltingState, halting_score

__all__ = ["AViTTimm", "AViTState"]


class AViTState:
    """Per-call state of one patched model; reset by every ``forward_features`` call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, grid: Optional[Tuple[int, int]] = None) -> None:
        self.grid = grid  # patch grid of the last input, for the depth map
        self.halting: Optional[HaltingState] = None
        self.active: List[Any] = []  # active tokens entering each block, summed over the batch
        self.computed: List[int] = []  # tokens each block computed, summed over the batch
        self.mode = ""
        self.images = self.tokens = 0


class AViTTimm(TimmViTPatch):
    method = "avit"
    SUPPORTED = TimmViTPatch.SUPPORTED + " in model.blocks"

    def __init__(self, model: Any, config: AViT) -> None:
        super().__init__(model, config)
        if not isinstance(model.blocks, torch.nn.Sequential):
            raise TypeError(f"avit: {self.name}.blocks is {type(model.blocks).__name__}, not the "
                            f"nn.Sequential timm builds; supported: {self.SUPPORTED}")

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = AViTState()
        cfg = self.config
        self.hooks.add(self.target.blocks, self._blocks_forward)
        self.patched_modules["blocks"] = (f"A-ViT halting ({cfg.mode}) gamma={cfg.gamma} beta={cfg.beta} "
                                          f"eps={cfg.eps} over {len(self.blocks)} blocks")
        self.hooks.add(self.target, self._forward_features, "forward_features")
        if callable(getattr(self.target, "forward_intermediates", None)):
            self.hooks.add(self.target, self._forward_intermediates, "forward_intermediates")

    # -- hooks ----------------------------------------------------------------------------------
    def _forward_features(self, model: Any, call_next: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        attn_mask = kwargs.get("attn_mask", args[0] if args else None)
        is_causal = kwargs.get("is_causal", args[1] if len(args) > 1 else False)
        if not self.config.never_halts:
            if attn_mask is not None or is_causal:
                raise ValueError("avit: attn_mask/is_causal cannot be combined with token halting; unpatch first")
            if getattr(model, "grad_checkpointing", False):
                raise ValueError("avit: gradient checkpointing runs the blocks outside model.blocks' forward, "
                                 "which A-ViT needs; call model.set_grad_checkpointing(False)")
        self.state.reset(grid=patch_grid(model, x))
        return call_next(x, *args, **kwargs)

    def _forward_intermediates(self, model: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.config.never_halts:
            raise NotImplementedError("avit: forward_intermediates runs the blocks one by one, without halting; "
                                      "use model.forward_features (or unpatch first)")
        return call_next(*args, **kwargs)

    def _blocks_forward(self, blocks: Any, call_next: Any, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        state.reset(grid=state.grid)
        batch, n, _ = x.shape
        state.images, state.tokens = batch, n
        if self.config.never_halts:  # every score is 0: timm's own blocks, bit-exact
            state.mode = "identity"
            state.active, state.computed = [batch * n] * len(self.blocks), [batch * n] * len(self.blocks)
            return call_next(x)
        can_halt = torch.arange(n, device=x.device) >= self.num_prefix
        remove = self.config.mode == "remove" and not blocks.training
        state.mode = "remove" if remove else "mask"
        state.halting = HaltingState(batch, n, len(self.blocks), self.config.eps, can_halt, x.shape[-1],
                                     x.device, x.dtype, record=not remove)
        out = self._remove(x) if remove else self._mask(x)
        return out.view(x.shape)

    # -- the two paths ----------------------------------------------------------------------------
    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        """Static shapes: all tokens computed, halted ones masked out as keys and not updated."""
        state, halting, cfg = self.state, self.state.halting, self.config
        batch, n, width = x.shape
        eye = torch.eye(n, device=x.device, dtype=torch.bool)
        for i, blk in enumerate(self.blocks):
            active = halting.active.view(batch, n)
            state.active.append(active.sum())  # a tensor: no host sync in the static path
            state.computed.append(batch * n)
            mask = active[:, None, None, :] | eye  # [B, 1, N, N]: keys still active, and itself
            y = block_forward(blk, self.post_norm[i], x, attn_mask=mask)
            x = torch.where(active[..., None], y, x)
            halting.step(halting_score(x, cfg.gamma, cfg.beta).reshape(-1), x.reshape(batch * n, width))
        return halting.output

    def _remove(self, x: torch.Tensor) -> torch.Tensor:
        """Halted tokens gathered out: block l computes only the tokens still active."""
        state, halting, cfg = self.state, self.state.halting, self.config
        batch, n, width = x.shape
        index = torch.arange(batch * n, device=x.device)  # flat position b * N + t of each packed token
        image = index // n
        count = torch.full((batch,), n, dtype=torch.long, device=x.device)  # active tokens per image
        counts = [n] * batch
        packed = x.reshape(batch * n, width)
        for i, blk in enumerate(self.blocks):
            total = packed.shape[0]
            if total == 0:  # no prefix token and every token halted
                break
            state.active.append(total)
            state.computed.append(total)
            packed = self._packed_block(blk, self.post_norm[i], packed, image, counts, count)
            halt = halting.step(halting_score(packed, cfg.gamma, cfg.beta), packed, index)
            if i == len(self.blocks) - 1:
                break
            keep = ~halt
            count = torch.zeros_like(count).scatter_add_(0, image, keep.long())
            # The one host sync of a block: the new shapes (the packed list, the padded attention)
            # depend on how many tokens of each image are left.
            counts = count.tolist()
            kept = sum(counts)
            if kept < total:
                packed, where = compact_tokens(packed[None], keep[None], kept)
                index, image = index[where], image[where]  # [T'] bookkeeping of the packed tokens
        return halting.output

    def _packed_block(self, blk: Any, post_norm: bool, packed: torch.Tensor, image: torch.Tensor,
                      counts: Sequence[int], count: torch.Tensor) -> torch.Tensor:
        """One block on the packed active tokens ``[T, C]`` of ``len(counts)`` images (sorted by
        image, ``counts[b]`` each; ``count``: the same on the device)."""
        seq = packed[None]  # [1, T, C]: every per-token op runs on exactly the active tokens
        q, k, v, gate = split_heads(blk.attn, seq if post_norm else blk.norm1(seq))  # [1, H, T, D]
        out = _per_image_attention(q, k, v, image, counts, count)
        seq = attn_residual(blk, post_norm, seq, merge_heads(blk.attn, out, gate))
        return mlp_residual(blk, post_norm, seq)[0]

    # -- reporting ------------------------------------------------------------------------------
    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or not state.computed:
            return None
        halting = state.halting
        return {
            "mode": state.mode,
            "active_tokens": [int(a) for a in state.active],
            "computed_tokens": list(state.computed),
            "mean_depth": float(len(self.blocks)) if halting is None else float(halting.mean_depth()),
        }

    def depth_map(self) -> Optional[torch.Tensor]:
        """``[B, gh, gw]`` long: the blocks each patch went through in the last call (``[B, N-P]``
        when the tokens do not form the recorded grid); None before the first call."""
        state = self.state
        if state is None or not state.computed:
            return None
        halting = state.halting
        if halting is None:  # identity: every token ran every block
            shape = (state.images, *state.grid) if state.grid else (state.images, state.tokens - self.num_prefix)
            return torch.full(shape, len(self.blocks))
        depth = halting.depth.view(halting.batch, halting.tokens)[:, self.num_prefix:]
        grid = state.grid
        if grid is not None and grid[0] * grid[1] == depth.shape[1]:
            return depth.reshape(halting.batch, *grid)
        return depth


def _per_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: torch.Tensor,
                         counts: Sequence[int], count: torch.Tensor) -> torch.Tensor:
    """Attention of packed ``q, k, v: [1, H, T, D]`` within each image (tokens sorted by image,
    ``counts[b]`` of image b, ``count`` the same ``[B]`` on the device); returns ``[1, H, T, D]``."""
    batch, longest, total = len(counts), max(counts), q.shape[2]
    heads, dim = q.shape[1], q.shape[3]
    if longest * batch == total:  # equal counts: a plain batch, nothing to pad
        def to_batch(t): return t.view(heads, batch, longest, dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(to_batch(q), to_batch(k), to_batch(v))
        return out.transpose(0, 1).reshape(1, heads, total, dim)
    start = torch.cumsum(count, 0) - count
    # row of each token in the padded [B * n_max] layout: image b's tokens fill rows b * n_max + 0..count[b]-1
    rows = (torch.arange(total, device=q.device) - start[image] + image * longest)[None]  # [1, T]

    def pad(t: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [B, H, n_max, D], zeros after each image
        zeros = t.new_zeros(1, batch * longest, heads * dim)
        padded = scatter_tokens(zeros, rows, t.transpose(1, 2).reshape(1, total, heads * dim))
        return padded.view(batch, longest, heads, dim).transpose(1, 2)

    padding = torch.arange(longest, device=q.device) >= count[:, None]  # [B, n_max]
    key_bias = torch.zeros(batch, longest, device=q.device).masked_fill_(padding, float("-inf"))
    out = biased_attention(pad(q), pad(k), pad(v), key_bias)  # [B, H, n_max, D]: padded keys masked
    out = gather_tokens(out.transpose(1, 2).reshape(1, batch * longest, heads * dim), rows)[0]  # [T, H * D]
    return out.view(total, heads, dim).transpose(0, 1)[None]
