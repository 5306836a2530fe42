"""Base of the adapters for diffusers: a pipeline or its denoiser, resolved once.

A method patched on a pipeline hooks modules of its denoiser (``pipe.unet`` or
``pipe.transformer``) and the pipeline's ``__call__`` (one call = one sampling run); patched on a
bare denoiser it hooks only the denoiser. Both are served by one adapter: ``self.model`` is the
denoiser, ``self.pipe`` the pipeline or None, ``self.prefix`` the denoiser's name inside the
pipeline for ``describe``. The patch covers both objects, so the registry records it on each.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Tuple

from ..families import is_diffusers_pipeline, is_loaded_instance, qualified_name
from .base import MethodPatch
from .steps import call_counting_steps

__all__ = ["DiffusersPatch", "attend_to", "UNET", "PIXART", "DIT"]

_DENOISER_ATTRS = ("unet", "transformer")
# The denoisers the adapters serve, as (module, class name): checked without importing diffusers.
UNET = ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel")
PIXART = ("diffusers.models.transformers.pixart_transformer_2d", "PixArtTransformer2DModel")
DIT = ("diffusers.models.transformers.dit_transformer_2d", "DiTTransformer2DModel")


def attend_to(attn: Any, call: Any, hidden_states: Any, context: Any, **kwargs: Any) -> Any:
    """A diffusers self-attention ``attn`` with queries from ``hidden_states`` and keys/values from
    ``context`` (ToDo's downsampled grid, RegionCache's cached tokens), passed as its
    ``encoder_hidden_states``; ``call`` runs ``attn`` (``attn`` itself, or the rest of a hook chain).

    ``fuse_qkv_projections()`` gives self-attention one fused q/k/v projection and a processor that
    reads keys/values of another source with ``to_kv``, which only cross-attention gets. Such a
    module keeps its unfused projections (same weights), so diffusers' standard processor computes
    it for us then; equal to the fused computation within float tolerance.
    """
    if getattr(attn, "to_kv", None) is None and "Fused" in type(getattr(attn, "processor", None)).__name__:
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states=context, **kwargs)
    return call(hidden_states, encoder_hidden_states=context, **kwargs)


class DiffusersPatch(MethodPatch):
    """Subclasses list the denoiser classes they serve in ``MODELS`` as (module, class name)."""

    MODELS: ClassVar[Tuple[Tuple[str, str], ...]] = ()

    def __init__(self, obj: Any, config: Any) -> None:
        super().__init__(obj, config)
        model = self.model_of(obj)
        if model is None:
            raise TypeError(f"{self.method}: {qualified_name(obj)} is not supported; supported: {self.SUPPORTED}")
        self.model = model
        self.pipe = None if model is obj else obj
        attr = next((a for a in _DENOISER_ATTRS if getattr(self.pipe, a, None) is model), "")
        self.prefix = f"{attr}." if self.pipe is not None else ""

    @classmethod
    def is_denoiser(cls, obj: Any) -> bool:
        return any(is_loaded_instance(obj, module, name) for module, name in cls.MODELS)

    @classmethod
    def model_of(cls, obj: Any) -> Optional[Any]:
        """The served denoiser of a pipeline (``unet`` or ``transformer``), ``obj`` itself if it is
        one, or None."""
        if is_diffusers_pipeline(obj):
            return next((m for m in (getattr(obj, a, None) for a in _DENOISER_ATTRS) if cls.is_denoiser(m)), None)
        return obj if cls.is_denoiser(obj) else None

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return cls.model_of(obj) is not None

    def covers(self) -> Tuple[Any, ...]:
        return (self.target,) if self.pipe is None else (self.pipe, self.model)

    # -- the pipeline call ----------------------------------------------------------------------
    def hook_pipeline_call(self, what: str) -> None:
        """On a pipeline, hook its ``__call__`` with ``_pipeline_call`` (reported as ``what``)."""
        if self.pipe is not None:
            self.hooks.add(self.pipe, self._pipeline_call, "__call__")
            self.patched_modules["__call__"] = what

    def _pipeline_call(self, pipe: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """Default: one sampling run, with the state reset and ``_scheduler_step`` on every step."""
        return call_counting_steps(self.state, pipe, call_next, self._scheduler_step, args, kwargs)

    def _scheduler_step(self, scheduler: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        return call_next(*args, **kwargs)
