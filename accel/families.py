"""Recognise what an object is, without importing a framework the user has not imported.

A timm model can only exist if ``timm`` is already in ``sys.modules``, so checks look there
instead of importing; ``import accel`` stays cheap and framework-free.
"""
from __future__ import annotations

import sys
from typing import Any, List, Tuple

__all__ = ["qualified_name", "is_loaded_instance", "is_timm_vit", "is_compiled_module", "is_diffusers_pipeline",
           "parts", "family"]


def qualified_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _loaded_class(module_name: str, class_name: str) -> Any:
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def is_loaded_instance(obj: Any, module_name: str, class_name: str) -> bool:
    """``isinstance(obj, module_name.class_name)`` if that module is already imported, else False."""
    cls = _loaded_class(module_name, class_name)
    return cls is not None and isinstance(obj, cls)


def is_diffusers_pipeline(obj: Any) -> bool:
    """Any diffusers ``DiffusionPipeline`` (text-to-image, img2img, inpaint, ControlNet, DiT, PixArt ...)."""
    return is_loaded_instance(obj, "diffusers.pipelines.pipeline_utils", "DiffusionPipeline")


def parts(obj: Any) -> List[Tuple[str, Any]]:
    """(name, object) of the components a diffusers pipeline holds (its UNet or transformer, VAE,
    text encoders, scheduler ...): what a patch on the pipeline may hook. Empty for anything else."""
    if not is_diffusers_pipeline(obj):
        return []
    # registered modules appear in the config as (library, class name); ``components`` would also
    # check the pipeline's signature and raise for a pipeline built by hand
    found = [(name, getattr(obj, name, None)) for name, value in dict(getattr(obj, "config", {})).items()
             if not name.startswith("_") and isinstance(value, (tuple, list)) and len(value) == 2]
    return [(name, part) for name, part in found if part is not None and hasattr(part, "__dict__")]


def is_timm_vit(obj: Any) -> bool:
    """A timm ``VisionTransformer`` or subclass (ViT, DeiT, DeiT-3, distilled, registers)."""
    cls = _loaded_class("timm.models.vision_transformer", "VisionTransformer")
    return cls is not None and isinstance(obj, cls)


def is_compiled_module(obj: Any) -> bool:
    """The wrapper ``torch.compile`` returns for an ``nn.Module``."""
    cls = _loaded_class("torch._dynamo.eval_frame", "OptimizedModule")
    return cls is not None and isinstance(obj, cls)


def family(obj: Any) -> str:
    """A short name for the kind of object, for messages and ``describe``."""
    if is_timm_vit(obj):
        return "timm.VisionTransformer"
    return qualified_name(obj)
