"""ToMe for diffusers UNets and DiTs (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", 2023),
and ToDo's key/value downsampling (Smith et al., 2024).

Every ``BasicTransformerBlock`` at the chosen resolutions gets a hook (``accel.hooks``) that runs
the block from its own submodules (norms, ada-norm modulation and gates, ``scale_shift_table``,
``pos_embed``, the attention modules with their processors, the feed-forward) with the paper's
change: one matching per block computed on the normed tokens self-attention sees, then
merge -> op -> unmerge around the chosen ops (Sec. 4: self-attention by default; cross-attention
and MLP optional). In ``mode="downsample"``, self-attention instead takes its keys and values
from the grid subsampled by ``downsample_factor`` (passed as the attention's context, so
processors and LoRA run as they are). Blocks that merge nothing this call run diffusers' own
forward: ratio 0 is bit-exact with the unpatched model.

The latent size is recorded by a hook on the model's forward; each block derives its grid from
its token count (the UNet halves sizes with ceil, so odd latents work).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...families import is_loaded_instance
from ..diffusers_model import DIT, PIXART, UNET, DiffusersPatch, attend_to
from .config import ToMe
from .merge2d import bipartite_soft_matching_random2d, downsample_tokens

__all__ = ["ToMeDiffusers", "ToMeDiffusionState"]

_NORM_TYPES = ("layer_norm", "ada_norm", "ada_norm_zero", "ada_norm_single")
_BLOCK_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
               "cross_attention_kwargs", "class_labels", "added_cond_kwargs")
_LEVELS = (1, 2, 4, 8, 16, 32, 64)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gated_residual(norm_type: str, gate: Optional[torch.Tensor], out: torch.Tensor,
                    hidden_states: torch.Tensor) -> torch.Tensor:
    """``hidden_states + gate * out`` as diffusers' block adds an op's output: the adaLN gate for
    ada_norm_zero ``[B, C]`` and ada_norm_single ``[B, 1, C]``, none for the other norms."""
    if norm_type == "ada_norm_zero":
        out = gate.unsqueeze(1) * out
    elif norm_type == "ada_norm_single":
        out = gate * out
    hidden_states = out + hidden_states
    return hidden_states.squeeze(1) if hidden_states.ndim == 4 else hidden_states


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ToMeDiffusionState:
    """Per-call state of one patched model; ``begin`` at the start of each model forward."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: Dict[torch.device, torch.Generator] = {}  # ours, so the pipeline's noise is untouched
        self.latent: Optional[Tuple[int, int]] = None
        self.per_level: Dict[int, Dict[str, Any]] = {}

    def reseed(self) -> None:
        """Start the destinations' random stream again (at each pipeline call)."""
        self.generators = {}

    def begin(self, height: int, width: int) -> None:
        self.latent = (height, width)
        self.per_level = {}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            try:
                gen = torch.Generator(device=device)
            except RuntimeError:  # a device without its own generators: draw on the CPU
                gen = self.generators.get(torch.device("cpu")) or torch.Generator()
            gen.manual_seed(self.seed)
            self.generators[device] = gen
        return gen

    def grid(self, num_tokens: int, hint: int) -> Optional[Tuple[int, int, int]]:
        """(downsample factor, h, w) whose ceil-divided latent holds ``num_tokens``, or None."""
        if self.latent is None:
            return None
        height, width = self.latent
        for level in (hint,) + _LEVELS:
            h, w = _ceil_div(height, level), _ceil_div(width, level)
            if h * w == num_tokens:
                return level, h, w
        return None

    def record(self, level: int, h: int, w: int, tokens: int, key: str, value: int) -> None:
        if torch.compiler.is_compiling():
            return
        entry = self.per_level.setdefault(level, {"grid": [h, w], "blocks": 0, "tokens": tokens, key: value})
        entry["blocks"] += 1


class _Ops:
    """What one block call does around each op: merge/unmerge pairs, and the key/value source of attn1."""

    def __init__(self) -> None:
        self.attn1: Tuple[Callable, Callable] = (_identity, _identity)
        self.attn2: Tuple[Callable, Callable] = (_identity, _identity)
        self.mlp: Tuple[Callable, Callable] = (_identity, _identity)
        self.kv: Optional[Callable] = None  # normed tokens -> keys/values source of self-attention
        self.match: Optional[Tuple[int, int, int, Optional[torch.Generator], bool]] = None  # h, w, r, gen, no_rand
        self.flags: Dict[str, bool] = {}  # which of attn1/attn2/mlp merge


class ToMeDiffusers(DiffusersPatch):
    method = "tome"
    SUPPORTED = "diffusers pipelines with a UNet2DConditionModel, PixArtTransformer2DModel or DiTTransformer2DModel"
    MODELS = (UNET, PIXART, DIT)

    @classmethod
    def tune_values(cls, obj: Any) -> Tuple[Any, ...]:
        return (0.25, 0.5, 0.75)  # merge ratios; tomesd's README measures 0.1-0.75, 0.5 its default

    def __init__(self, obj: Any, config: ToMe) -> None:
        super().__init__(obj, config)
        from diffusers.models.attention import BasicTransformerBlock

        model, prefix = self.model, self.prefix
        name = type(model).__name__
        config.check_for_diffusion(name)
        is_unet = is_loaded_instance(model, *UNET)
        self.patch_size = 1 if is_unet else int(model.config.patch_size or 1)
        levels = self._unet_levels(model) if is_unet else {id(m): 1 for m in model.modules()}
        self.skipped: Dict[str, str] = {}
        found: List[Tuple[str, Any, int]] = []
        for qual, module in model.named_modules():
            if not isinstance(module, BasicTransformerBlock):
                continue
            qual = prefix + qual
            if type(module) is not BasicTransformerBlock:
                self.skipped[qual] = f"{type(module).__name__} overrides the block forward"
            elif module.norm_type not in _NORM_TYPES:
                self.skipped[qual] = f"norm_type {module.norm_type!r} not supported"
            elif id(module) not in levels:
                self.skipped[qual] = "resolution unknown"
            else:
                found.append((qual, module, levels[id(module)]))
        if not found:
            raise ValueError(f"tome: {name} has no transformer block ToMe can serve "
                             f"({len(self.skipped)} skipped: {sorted(set(self.skipped.values()))})")
        available = sorted({level for _, _, level in found})
        self.max_downsample = config.max_downsample or available[0]  # the highest resolution with attention
        self.blocks = [(q, m, level) for q, m, level in found if level <= self.max_downsample]
        if not self.blocks:
            raise ValueError(f"tome: {name} has no transformer block at downsample <= {self.max_downsample} "
                             f"(attention blocks at downsample {', '.join(map(str, available))}); raise max_downsample")
        from diffusers.models.attention import _chunked_feed_forward

        self._chunked_ff = _chunked_feed_forward

    @staticmethod
    def _unet_levels(unet: Any) -> Dict[int, int]:
        """id(module) -> latent downsample factor, walking the UNet's levels."""
        levels: Dict[int, int] = {}
        level = 1

        def mark(block: Any) -> None:
            for module in block.modules():
                levels[id(module)] = level

        for block in unet.down_blocks:
            mark(block)  # attention runs before the block's downsampler
            if getattr(block, "downsamplers", None):
                level *= 2
        if unet.mid_block is not None:
            mark(unet.mid_block)
        for block in unet.up_blocks:
            mark(block)  # and before the upsampler
            if getattr(block, "upsamplers", None):
                level = max(1, level // 2)
        return levels

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = ToMeDiffusionState(self.config.seed)
        self.hooks.add(self.model, self._model_forward)
        # a pipeline: the same call with the same seed gives the same image
        self.hook_pipeline_call("reseeds ToMe's generator at each call")
        cfg = self.config
        if cfg.mode == "downsample":
            what = f"self-attention keys/values downsampled x{cfg.downsample_factor} ({cfg.downsample_method})"
        else:
            ops = [op for op, on in (("attn1", cfg.merge_attn), ("attn2", cfg.merge_crossattn),
                                     ("ff", cfg.merge_mlp)) if on]
            what = f"merge ratio={cfg.ratio} around {'/'.join(ops)}"
        for qual, block, level in self.blocks:
            self.hooks.add(block, functools.partial(self._block_forward, level))
            self.patched_modules[qual] = f"{what} at downsample {level}"

    # -- hooks ----------------------------------------------------------------------------------
    def _pipeline_call(self, pipe: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state is not None:
            self.state.reseed()
        return call_next(*args, **kwargs)

    def _model_forward(self, model: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self.state.begin(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return call_next(*args, **kwargs)

    def _block_forward(self, level: int, block: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(_BLOCK_ARGS) or any(k not in _BLOCK_ARGS for k in kwargs):
            return call_next(*args, **kwargs)  # a call this diffusers version's block does not know
        bound = dict(zip(_BLOCK_ARGS, args), **kwargs)
        x = bound["hidden_states"]
        xattn = bound.get("cross_attention_kwargs") or {}
        grid = self.state.grid(x.shape[1], level) if x.ndim == 3 else None
        if grid is None or "gligen" in xattn:
            return call_next(*args, **kwargs)  # not on a known grid, or GLIGEN's fuser: diffusers' own forward
        level, h, w = grid
        ops = self._plan(block, x, h, w, level)
        if ops is None:
            return call_next(*args, **kwargs)  # nothing changes this call: exact
        if bound.get("attention_mask") is not None and (ops.kv is not None or ops.attn1[0] is not _identity):
            raise ValueError("tome: a self-attention attention_mask cannot be combined with merging/downsampling "
                             "self-attention tokens; unpatch first")
        return self._run_block(block, ops, **bound)

    def _plan(self, block: Any, x: torch.Tensor, h: int, w: int, level: int) -> Optional[_Ops]:
        """The ops for this block call, or None when it would change nothing. Shapes only: no sync."""
        cfg, n, ops = self.config, x.shape[1], _Ops()
        self_attn1 = not block.only_cross_attention
        if cfg.mode == "downsample":
            kv_tokens = _ceil_div(h, cfg.downsample_factor) * _ceil_div(w, cfg.downsample_factor)
            self.state.record(level, h, w, n, "kv_tokens", kv_tokens if self_attn1 else n)
            if not self_attn1 or kv_tokens == n:
                return None
            ops.kv = functools.partial(downsample_tokens, h=h, w=w, factor=cfg.downsample_factor,
                                       method=cfg.downsample_method)
            return ops
        num_dst = (h // cfg.sy) * (w // cfg.sx)
        r = min(int(n * cfg.ratio), n - num_dst) if num_dst else 0  # paper: r = ratio * N, capped by the sources
        self.state.record(level, h, w, n, "merged", r)
        if r <= 0:
            return None
        flags = {"attn1": cfg.merge_attn if self_attn1 else cfg.merge_crossattn,
                 "attn2": cfg.merge_crossattn and block.attn2 is not None, "mlp": cfg.merge_mlp}
        if not any(flags.values()):
            return None
        gen = self.state.generator(x.device) if cfg.use_rand else None
        no_rand = not cfg.use_rand or x.shape[0] % 2 == 1  # odd batch: fixed top-left, as the paper's code
        ops.match = (h, w, r, gen, no_rand)  # matched lazily on the normed tokens of the block
        ops.flags = flags
        return ops

    def _bind_merges(self, ops: _Ops, metric: torch.Tensor) -> None:
        h, w, r, gen, no_rand = ops.match
        cfg = self.config
        match = bipartite_soft_matching_random2d(metric, w, h, cfg.sx, cfg.sy, r, generator=gen, no_rand=no_rand)
        pair = (match.merge, match.unmerge)
        for op, on in ops.flags.items():
            if on:
                setattr(ops, op, pair)

    def _run_block(self, block: Any, ops: _Ops, hidden_states: torch.Tensor, attention_mask=None,
                   encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                   cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None) -> torch.Tensor:
        """diffusers' ``BasicTransformerBlock.forward`` for the supported norm types, with the ops inserted."""
        norm_type, batch = block.norm_type, hidden_states.shape[0]
        kwargs = dict(cross_attention_kwargs or {})
        gate_msa = gate_mlp = None  # the adaLN gates, for the norm types that have them
        # 0. Self-attention input (norm1 and its modulation).
        if norm_type == "ada_norm":
            normed = block.norm1(hidden_states, timestep)
        elif norm_type == "ada_norm_zero":
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
        elif norm_type == "ada_norm_single":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)
            normed = block.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        else:
            normed = block.norm1(hidden_states)
        if block.pos_embed is not None:
            normed = block.pos_embed(normed)
        if ops.match is not None:
            # Paper, Sec. 4: one matching per block, on the tokens the block's first op sees.
            self._bind_merges(ops, normed)

        # 1. Self-attention (cross-attention when only_cross_attention).
        merge, unmerge = ops.attn1
        if ops.kv is not None:  # ToDo: queries stay, keys/values from the downsampled grid
            out = attend_to(block.attn1, block.attn1, normed, ops.kv(normed), attention_mask=attention_mask, **kwargs)
        else:
            context = encoder_hidden_states if block.only_cross_attention else None
            out = unmerge(block.attn1(merge(normed), encoder_hidden_states=context, attention_mask=attention_mask,
                                      **kwargs))
        hidden_states = _gated_residual(norm_type, gate_msa, out, hidden_states)

        # 2. Cross-attention (PixArt feeds the residual stream itself, without norm2).
        if block.attn2 is not None:
            if norm_type == "ada_norm":
                normed = block.norm2(hidden_states, timestep)
            elif norm_type == "ada_norm_single":
                normed = hidden_states
            else:
                normed = block.norm2(hidden_states)
            if block.pos_embed is not None and norm_type != "ada_norm_single":
                normed = block.pos_embed(normed)
            merge, unmerge = ops.attn2
            out = unmerge(block.attn2(merge(normed), encoder_hidden_states=encoder_hidden_states,
                                      attention_mask=encoder_attention_mask, **kwargs))
            hidden_states = out + hidden_states

        # 3. Feed-forward.
        if norm_type == "ada_norm_single":
            normed = block.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        else:
            normed = block.norm3(hidden_states)
            if norm_type == "ada_norm_zero":
                normed = normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        merge, unmerge = ops.mlp
        normed = merge(normed)
        chunk, dim = block._chunk_size, block._chunk_dim
        if chunk is not None and normed.shape[dim] % chunk == 0:
            out = self._chunked_ff(block.ff, normed, dim, chunk)
        else:  # merged token counts need not divide the chunk size; chunking does not change the result
            out = block.ff(normed)
        return _gated_residual(norm_type, gate_mlp, unmerge(out), hidden_states)

    # -- reporting ------------------------------------------------------------------------------
    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or state.latent is None:
            return None
        return {"latent": list(state.latent),
                "per_downsample": {level: dict(entry) for level, entry in sorted(state.per_level.items())}}

    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        latent = None if self.state is None else self.state.latent
        per_level: Dict[int, Dict[str, Any]] = {}
        for _, _, level in self.blocks:
            entry = per_level.setdefault(level, {"blocks": 0, "grid": None})
            entry["blocks"] += 1
            if latent is not None:
                entry["grid"] = [_ceil_div(latent[0], level), _ceil_div(latent[1], level)]
        info["model"] = type(self.model).__name__
        info["max_downsample"] = self.max_downsample
        info["resolutions"] = dict(sorted(per_level.items()))
        info["skipped"] = dict(self.skipped)
        return info
