"""RegionCache for DiT-style diffusers transformers (after RAS, Liu et al. 2025, "Region-Adaptive
Sampling for Diffusion Transformers").

Full steps (warm-up, refresh, or nothing valid cached) run the transformer unchanged and record,
per block, the input of self-attention (``attn1``) of every token, and the model output. A cached
step computes only the chosen tokens (``regions.select_tokens`` on the previous step's output):

- the first block's hook gathers the chosen tokens ``[B, N, C] -> [B, k, C]``; the blocks then run
  diffusers' own forward on them: every op of a ``BasicTransformerBlock`` is per token (norms,
  adaLN modulation and gates, cross-attention queries, feed-forward) except self-attention;
- ``attn1``'s hook gives self-attention all ``N`` tokens as keys/values, as RAS does: the chosen
  tokens' current inputs, the others' inputs from the step they were last computed (the cache
  is updated with the chosen tokens). Caching the attention input instead of K/V keeps the
  attention processor, LoRA and qk-norm as they are; it costs the K/V projections of the skipped
  tokens, the queries, attention rows and MLP run on ``k`` tokens only;
- the last block's hook scatters them back to ``N`` tokens for the output head; the skipped
  tokens' output patches are then replaced by their cached output of the previous step.

A pipeline call resets the state and hooks its scheduler's ``step`` for the call's duration: one
``step`` ends a denoising step, and its ``model_output`` (under classifier-free guidance the
guided output, shared by the cond/uncond halves) scores the tokens for the next step. A bare
transformer counts one call per step and scores on its own output (``accel.region_cache.reset``
starts a new run). No value is read back to the host.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...kernels import gather_tokens, scatter_tokens
from ..diffusers_model import DIT, PIXART, DiffusersPatch, attend_to
from .config import RegionCache
from .regions import pixel_mask, region_ids, select_tokens, token_mask, token_scores

__all__ = ["RegionCacheDiT", "RegionCacheState"]

_MAX_STARVATION = 60.0  # exp(60) ~ 1e26: any longer-skipped token wins anyway; keeps float32 finite


def _sample_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (sample,) + out[1:]
    out.sample = sample
    return out


class _Plan:
    """One cached transformer call: the chosen tokens ``[B, k]`` and the first block's input."""

    def __init__(self, chosen: torch.Tensor) -> None:
        self.chosen = chosen
        self.base: Optional[torch.Tensor] = None


class RegionCacheState:
    """Per-run state of one patched transformer/pipeline; reset at the start of each pipeline call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0  # denoising step of the run
        self.in_call = False  # inside a pipeline __call__
        self.calls_in_step = 0
        self.signature: Optional[Tuple[Any, ...]] = None  # input shape/dtype/device the caches belong to
        self.grid: Optional[Tuple[int, int]] = None  # token grid (h, w)
        self.output: Optional[torch.Tensor] = None  # [B_t, C_out, H, W] last transformer output
        self.kv: Dict[int, torch.Tensor] = {}  # block -> [B_t, N, C] attn1 input of each token when last computed
        self.computed: Optional[torch.Tensor] = None  # [B_t, N] bool: tokens computed by the last call
        self.scores: Optional[torch.Tensor] = None  # [B_s, N] float32 focus score (rows of the score source)
        self.skipped: Optional[torch.Tensor] = None  # [B_s, N] steps since each token was last computed
        self.previous: Optional[torch.Tensor] = None  # [B_s, C, H, W] last score source ("delta")
        self.plan: Optional[_Plan] = None  # set during a cached call
        self.recording = False  # during a full call
        self.tokens_per_step: List[int] = []
        self.full_steps: List[int] = []
        self.counts: Optional[torch.Tensor] = None  # [B_t, N] steps each token was computed

    def free(self) -> None:
        """Drop the cached tensors after a pipeline call; the report stays."""
        self.output, self.kv, self.previous, self.scores, self.skipped = None, {}, None, None, None
        self.signature = self.computed = None


class RegionCacheDiT(DiffusersPatch):
    method = "region_cache"
    SUPPORTED = ("diffusers DiTTransformer2DModel and PixArtTransformer2DModel, bare or as the transformer of a "
                 "pipeline (DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline)")
    MODELS = (DIT, PIXART)

    @classmethod
    def tune_values(cls, obj: Any) -> Tuple[Any, ...]:
        return (0.75, 0.5, 0.25)  # fractions of the tokens recomputed on a cached step

    def __init__(self, obj: Any, config: RegionCache) -> None:
        super().__init__(obj, config)
        from diffusers.models.attention import BasicTransformerBlock

        model = self.model
        name = type(model).__name__
        blocks = list(getattr(model, "transformer_blocks", []))
        if not blocks:
            raise ValueError(f"region_cache: {name} has no transformer_blocks")
        for i, block in enumerate(blocks):
            where = f"{self.prefix}transformer_blocks.{i}"
            if not isinstance(block, BasicTransformerBlock):
                raise TypeError(f"region_cache: {where} is a {type(block).__name__}; supported: {self.SUPPORTED}")
            if block.pos_embed is not None or block.only_cross_attention:
                # a per-position embedding inside the block, or no self-attention: not per token
                raise ValueError(f"region_cache: {where} has a positional embedding inside the block or no "
                                 f"self-attention; only blocks with per-token ops besides attn1 are supported")
        self.blocks = blocks
        self.patch_size = int(model.config.patch_size)
        self.in_channels = int(model.config.in_channels)
        self._regions: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = RegionCacheState()
        self.hooks.add(self.model, self._model_forward)
        self.patched_modules[self.prefix.rstrip(".") or "forward"] = "counts steps, picks full/cached, reuses outputs"
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            self.hooks.add(block, functools.partial(self._block_forward, i == 0, i == last))
            self.hooks.add(block.attn1, functools.partial(self._attn1_forward, i))
            ends = [what for what, on in (("gathers the chosen tokens", i == 0), ("scatters them back", i == last))
                    if on]
            self.patched_modules[f"{self.prefix}transformer_blocks.{i}"] = (
                f"cached steps: {self.config.ratio:g} of the tokens" + (f" ({'; '.join(ends)})" if ends else ""))
            self.patched_modules[f"{self.prefix}transformer_blocks.{i}.attn1"] = "keys/values of skipped tokens cached"
        self.hook_pipeline_call("per-call reset, scores on scheduler.step's model_output")

    def reset(self) -> None:
        if self.state is not None:
            self.state.reset()

    # -- steps ----------------------------------------------------------------------------------
    def _scheduler_step(self, scheduler: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """A denoising step ends: score the tokens on the output the scheduler integrates."""
        state = self.state
        if state is not None and state.in_call:
            source = args[0] if args else kwargs.get("model_output")
            if state.calls_in_step and isinstance(source, torch.Tensor) and source.ndim == 4:
                self._observe(source)
            state.step += 1
            state.calls_in_step = 0
        return call_next(*args, **kwargs)

    def _observe(self, source: torch.Tensor) -> None:
        """Update the focus scores of the tokens computed by the last call. source: [B_s, C, H, W]."""
        state, cfg = self.state, self.config
        computed, grid = state.computed, state.grid
        b_s = source.shape[0]
        p = self.patch_size
        if computed is None or (source.shape[-2] // p, source.shape[-1] // p) != grid:
            state.scores = None
            return
        if computed.shape[0] == 2 * b_s:  # classifier-free guidance: one guided output for both halves
            computed = computed[:b_s]
        elif computed.shape[0] != b_s:
            state.scores = None
            return
        previous, state.previous = state.previous, source.detach().clone()
        if cfg.metric == "delta":
            if previous is None or previous.shape != source.shape:
                state.scores = None
                return
            new = token_scores(source, previous, p, "delta")
        else:
            new = token_scores(source, None, p, cfg.metric)
        if state.scores is None or state.scores.shape != new.shape:
            state.scores, state.skipped = new, torch.zeros_like(new)
            return
        # tokens reused last step kept their output: their score stays the one of their last computation
        state.scores = torch.where(computed, new, state.scores)
        state.skipped = torch.where(computed, torch.zeros_like(state.skipped), state.skipped + 1)

    def _choose(self, batch: int, h: int, w: int, count: int, device: torch.device) -> Optional[torch.Tensor]:
        """[batch, count] token ids to compute, or None when no usable scores."""
        state, cfg = self.state, self.config
        scores = state.scores
        if scores is None or scores.shape[1] != h * w or batch not in (scores.shape[0], 2 * scores.shape[0]):
            return None
        if cfg.starvation:  # RAS: score * exp(scale * times dropped), so no region is starved for long
            scores = scores * torch.exp((cfg.starvation * state.skipped).clamp(max=_MAX_STARVATION))
        key = (h, w, device)
        if key not in self._regions:
            self._regions[key] = region_ids(h, w, cfg.window, device)
        num_regions = -(-h // cfg.window) * -(-w // cfg.window)
        chosen = select_tokens(scores, self._regions[key], num_regions, count)
        return torch.cat([chosen, chosen]) if batch == 2 * scores.shape[0] else chosen

    # -- hooks ----------------------------------------------------------------------------------
    def _model_forward(self, model: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        x = args[0] if args else kwargs.get("hidden_states")
        if (state is None or state.plan is not None or state.recording or not isinstance(x, torch.Tensor)
                or x.ndim != 4 or (self.pipe is not None and (not state.in_call or state.calls_in_step))):
            # nested, outside a pipeline call, or a second call in one step: plain forward, caches untouched
            return call_next(*args, **kwargs)
        state.calls_in_step += 1
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        n, step, batch = h * w, state.step, x.shape[0]
        count = max(1, round(self.config.ratio * n))
        signature = (tuple(x.shape), x.dtype, x.device)
        chosen = None
        if (count < n and not self.config.is_full(step) and state.signature == signature
                and len(state.kv) == len(self.blocks)):
            chosen = self._choose(batch, h, w, count, x.device)
        if chosen is None:  # full step: diffusers' forward, recording every block's attn1 input
            state.kv, state.recording, state.grid = {}, True, (h, w)
            try:
                out = call_next(*args, **kwargs)
            finally:
                state.recording = False
            sample = _sample_of(out)
            computed = torch.ones(batch, n, dtype=torch.bool, device=x.device)
            state.full_steps.append(step)
        else:
            state.plan = _Plan(chosen)
            try:
                out = call_next(*args, **kwargs)
            finally:
                state.plan = None
            computed = token_mask(chosen, n)
            # RAS: the skipped regions' output is the cached output of the previous step
            sample = torch.where(pixel_mask(computed, h, w, p), _sample_of(out), state.output)
            out = _with_sample(out, sample)
        state.output, state.signature, state.grid, state.computed = sample, signature, (h, w), computed
        state.tokens_per_step.append(n if chosen is None else count)
        counts = state.counts
        state.counts = computed.long() if counts is None or counts.shape != computed.shape else counts + computed
        if self.pipe is None:  # bare transformer: one call is one step, scored on its own output
            self._observe(sample[:, : self.in_channels])
            state.step += 1
            state.calls_in_step = 0
        return out

    def _block_forward(self, first: bool, last: bool, block: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        plan = None if self.state is None else self.state.plan
        if plan is None:
            return call_next(*args, **kwargs)
        if first:  # [B, N, C] -> the chosen [B, k, C]; the blocks' own forward is per token but attn1
            x = args[0] if args else kwargs["hidden_states"]
            plan.base = x
            x = gather_tokens(x, plan.chosen)
            if args:
                args = (x,) + args[1:]
            else:
                kwargs["hidden_states"] = x
        out = call_next(*args, **kwargs)
        if last:  # back to N tokens for the output head; skipped tokens' output is replaced afterwards
            out = scatter_tokens(plan.base, plan.chosen, out)
        return out

    def _attn1_forward(self, index: int, attn: Any, call_next: Any, hidden_states: torch.Tensor, *args: Any,
                       **kwargs: Any) -> Any:
        state = self.state
        if state is None:
            return call_next(hidden_states, *args, **kwargs)
        if state.recording:  # full step: every token's attention input, the K/V source of cached steps
            if hidden_states.ndim == 3 and hidden_states.shape[1] == state.grid[0] * state.grid[1]:
                state.kv[index] = hidden_states  # (anything else leaves the cache incomplete: next step full)
            return call_next(hidden_states, *args, **kwargs)
        if state.plan is None:
            return call_next(hidden_states, *args, **kwargs)
        # RAS: chosen queries attend to all tokens; skipped ones from their last computation
        context = scatter_tokens(state.kv[index], state.plan.chosen, hidden_states)
        state.kv[index] = context
        kwargs.update(zip(("encoder_hidden_states", "attention_mask"), args))  # diffusers' positional order
        kwargs.pop("encoder_hidden_states", None)
        return attend_to(attn, call_next, hidden_states, context, **kwargs)

    # -- reporting ------------------------------------------------------------------------------
    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or not state.tokens_per_step:
            return None
        h, w = state.grid
        return {
            "steps": len(state.tokens_per_step),
            "tokens": h * w,
            "grid": [h, w],
            "tokens_per_step": list(state.tokens_per_step),
            "full_steps": list(state.full_steps),
            # per batch row of the transformer (both CFG halves): steps each patch token was computed
            "computed_steps": state.counts.reshape(-1, h, w).tolist(),
        }

    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        info["model"] = type(self.model).__name__
        info["blocks"] = len(self.blocks)
        return info
