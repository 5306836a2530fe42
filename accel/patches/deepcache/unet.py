"""DeepCache adapter for diffusers ``UNet2DConditionModel`` and the pipelines that hold one.

The UNet keeps its own forward (LoRA, attention processors, offload hooks, SDXL added
conditioning, ControlNet/T2I residual bookkeeping all stay diffusers'); only modules inside it
are hooked. Branch ``k`` is a skip connection (``deep_units`` says which modules it skips):

- full step: everything runs; the outputs of the modules deeper than the branch are cached. The
  last of them is the paper's cached high-level feature ``F_cache`` (Eq. 3).
- shallow step: those modules return their cached outputs without computing (right shapes, so
  ``down_block_res_samples`` slicing stays consistent); conv_in, the time embedding, the layers
  that make and read skip features ``0..k`` and conv_out run on the current input (Eq. 4).

A pipeline counts steps by hooking its scheduler's ``step`` for the duration of each call; its
class is swapped to a subclass whose ``__call__`` resets the state (``__call__`` is looked up on
the type; ``accel.hooks`` does the swap). A bare UNet counts one step per call.
No timestep is read back to the host.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

from ...families import qualified_name
from ..diffusers_model import UNET, DiffusersPatch
from .config import DeepCache

__all__ = ["DeepCacheUNet", "DeepCacheState"]


def deep_units(unet: Any, branch: int) -> Tuple[List[Tuple[str, Any]], int]:
    """The modules a shallow step skips for ``branch``, in execution order, and the number of branches.

    Branches are the UNet's skip connections, numbered as ``down_block_res_samples`` is filled:
    0 is conv_in's output, then one per down layer (resnet + attention) and one per downsampler.
    The up path consumes them in reverse, one per up layer. Branch ``k`` keeps every producer of
    skip features ``0..k`` and every up layer that reads one of them; everything else (deeper down
    layers, the mid block, the up layers before the one reading feature ``k``) is skipped and
    returns its output from the last full step. The last skipped module's output is ``F_cache``.
    Whole blocks are skipped as one module when none of their layers stays.
    """
    units: List[Tuple[str, Any]] = []

    def layers(prefix: str, block: Any, indices: List[int]) -> None:
        attentions = getattr(block, "attentions", None)
        for j in indices:
            units.append((f"{prefix}.resnets.{j}", block.resnets[j]))
            if attentions is not None and j < len(attentions):
                units.append((f"{prefix}.attentions.{j}", attentions[j]))

    produced = 0  # index of the last skip feature made so far (0: conv_in)
    for i, block in enumerate(unet.down_blocks):
        samplers = list(block.downsamplers or [])
        first = produced + 1
        if first > branch:
            units.append((f"down_blocks.{i}", block))
        else:
            layers(f"down_blocks.{i}", block, [j for j in range(len(block.resnets)) if first + j > branch])
            after = first + len(block.resnets)
            units += [(f"down_blocks.{i}.downsamplers.{m}", d) for m, d in enumerate(samplers) if after + m > branch]
        produced += len(block.resnets) + len(samplers)
    if unet.mid_block is not None:
        units.append(("mid_block", unet.mid_block))
    consumed = produced  # the up path reads the features from the last one down
    for u, block in enumerate(unet.up_blocks):
        reads = [consumed - j for j in range(len(block.resnets))]
        if min(reads) > branch:
            units.append((f"up_blocks.{u}", block))
        else:
            layers(f"up_blocks.{u}", block, [j for j, feature in enumerate(reads) if feature > branch])
        consumed -= len(block.resnets)
    return units, produced + 1


def _hidden_copy(out: Any) -> Any:
    """A copy of a UNet block's hidden-state output: the tensor itself, or the first element of a
    down block's ``(hidden_states, res_samples)`` (skip features of skipped blocks are read only by
    skipped blocks, so they are shared)."""
    if isinstance(out, tuple) and out and hasattr(out[0], "clone"):
        return (out[0].clone(),) + out[1:]
    return out.clone() if hasattr(out, "clone") else out


class DeepCacheState:
    """Per-run state of one patched UNet/pipeline; reset at the start of each pipeline call."""

    def __init__(self, num_steps: Optional[int] = None) -> None:
        self.reset(num_steps)

    def reset(self, num_steps: Optional[int] = None) -> None:
        self.step = 0  # index of the current step in this run
        self.num_steps = num_steps  # planned steps of the run, when known
        self.full = True  # whether the current step runs the full UNet (step 0 always does)
        self.call_in_step = 0  # UNet calls so far in the current step (pipeline mode)
        # slot (k-th UNet call of a step) -> (input signature, {block name: cached output})
        self.caches: Dict[int, Tuple[Any, Dict[str, Any]]] = {}
        self.active: Optional[Dict[str, Any]] = None  # the cache the running UNet call reads/fills
        self.skip = False  # the running UNet call is shallow
        self.in_call = False  # inside a pipeline __call__
        self.unet_calls = 0
        self.full_unet_calls = 0
        self.full_steps: List[int] = []
        self.steps_seen = 0  # steps with at least one UNet call

    def free(self) -> None:
        """Drop the cached features after a pipeline call; the report stays."""
        self.caches = {}


class DeepCacheUNet(DiffusersPatch):
    method = "deepcache"
    SUPPORTED = "diffusers UNet2DConditionModel pipelines (SD 1.x/2.x, SDXL; text-to-image, img2img, inpaint, ControlNet)"
    MODELS = (UNET,)

    @classmethod
    def tune_values(cls, obj: Any) -> Tuple[Any, ...]:
        return (2, 3, 4, 5)  # full-UNet intervals; the DeepCache paper's SD 1.5 runs use 2-5

    def __init__(self, obj: Any, config: DeepCache) -> None:
        super().__init__(obj, config)
        unet = self.unet = self.model
        name = qualified_name(unet)
        down, up = list(unet.down_blocks), list(unet.up_blocks)
        depth = len(down)
        if depth == 0 or len(up) != depth:
            raise TypeError(
                f"deepcache: {name} has {depth} down and {len(up)} up blocks; DeepCache needs matching "
                f"down/up blocks; supported: {self.SUPPORTED}"
            )
        reads = sum(len(block.resnets) for block in up)
        made = 1 + sum(len(block.resnets) + len(block.downsamplers or []) for block in down)
        if reads != made:
            raise TypeError(f"deepcache: {name}'s up blocks read {reads} skip features but its down path makes "
                            f"{made}; supported: {self.SUPPORTED}")
        self.deep, branches = deep_units(unet, config.branch)
        if config.branch >= branches:
            raise ValueError(
                f"deepcache: branch must be in 0..{branches - 1} for {name} (its {branches} skip connections, "
                f"0 = conv_in's, the shallowest); got {config.branch}"
            )
        self.schedule = config.make_schedule()

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self.state = DeepCacheState()
        self.hooks.add(self.unet, self._unet_forward)
        self.patched_modules[self.prefix.rstrip(".") or "forward"] = "counts steps, picks full/shallow"
        last = self.deep[-1][0]
        for name, block in self.deep:
            self.hooks.add(block, functools.partial(self._deep_block, name))
            what = "F_cache (cached deep feature)" if name == last else "cached, skipped on shallow steps"
            self.patched_modules[self.prefix + name] = what
        self.hook_pipeline_call("per-call reset, counts scheduler.step")

    # -- per run --------------------------------------------------------------------------------
    def reset(self, num_steps: Optional[int] = None) -> None:
        if self.state is not None:
            self.state.reset(num_steps)

    def _planned_steps(self, scheduler: Any) -> Optional[int]:
        n = getattr(self.pipe, "_num_timesteps", None)  # len(timesteps) of the loop, set before it
        if isinstance(n, int) and n > 0:
            return n
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return len(timesteps) - int(getattr(scheduler, "begin_index", None) or 0)

    def _scheduler_step(self, scheduler: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """One denoising-loop iteration ends: the next one decides full or shallow."""
        out = call_next(*args, **kwargs)
        state = self.state
        if state is None or not state.in_call:
            return out
        if state.num_steps is None:
            state.num_steps = self._planned_steps(scheduler)
        state.step += 1
        state.call_in_step = 0
        if self.schedule.kind == "non-uniform" and state.num_steps is None:
            state.full = True  # the run's length is unknown: no plan, no skipping
        else:
            state.full = self.schedule.is_full(state.step, state.num_steps)
        return out

    # -- hooks ----------------------------------------------------------------------------------
    def _unet_forward(self, unet: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state is None or state.active is not None or (self.pipe is not None and not state.in_call):
            # nested, or the pipeline's UNet called outside a pipeline call: plain full UNet
            return call_next(*args, **kwargs)
        sample = args[0] if args else kwargs["sample"]  # [B, C, H, W]
        signature = (tuple(sample.shape), sample.dtype, sample.device)
        if self.pipe is None:  # bare UNet: one call = one step
            slot, full = 0, self.schedule.is_full(state.step, state.num_steps)
        else:
            slot, full = state.call_in_step, state.full
            state.call_in_step += 1
        cached = state.caches.get(slot)
        if cached is None or cached[0] != signature:
            full = True  # nothing (valid) to reuse: run in full
        outputs = {} if full else cached[1]
        state.active, state.skip = outputs, not full
        try:
            out = call_next(*args, **kwargs)
        finally:
            state.active, state.skip = None, False
        if full:
            state.caches[slot] = (signature, outputs)
            state.full_unet_calls += 1
            if not state.full_steps or state.full_steps[-1] != state.step:
                state.full_steps.append(state.step)
        state.unet_calls += 1
        state.steps_seen = state.step + 1
        if self.pipe is None:
            state.step += 1
        return out

    def _deep_block(self, name: str, block: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """A block deeper than the branch: computed and cached on full steps, reused on shallow ones.

        The cache keeps its own copy of the block's hidden-state output and hands out a fresh copy:
        the UNet and the blocks that read it may change it in place (FreeU scales half the channels
        of an up block's input, T2I-Adapter adds residuals to down and mid outputs), which would
        otherwise compound on the cached tensor at every shallow step."""
        state = self.state
        outputs = None if state is None else state.active
        if outputs is None:
            return call_next(*args, **kwargs)
        if state.skip:
            return _hidden_copy(outputs[name])
        out = call_next(*args, **kwargs)
        outputs[name] = _hidden_copy(out)
        return out

    # -- reporting ------------------------------------------------------------------------------
    def last_call(self) -> Optional[Dict[str, Any]]:
        state = self.state
        if state is None or state.unet_calls == 0:
            return None
        return {
            "steps": state.steps_seen,
            "planned_steps": state.num_steps,
            "full_steps": list(state.full_steps),
            "unet_calls": state.unet_calls,
            "full_unet_calls": state.full_unet_calls,
            "branch": self.config.branch,
            "cached_blocks": [name for name, _ in self.deep],
        }
