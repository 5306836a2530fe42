"""CLIP score (Hessel et al., 2021): ``100 * max(cos(image embedding, text embedding), 0)``, averaged.

Computed here rather than with torchmetrics' ``CLIPScore``: torchmetrics 1.9 reads
``get_image_features(...)`` as a tensor, which transformers 5 returns as a model output, so it
fails on current versions. Any ``(CLIPModel, CLIPProcessor)`` pair works; the default is the
project's own ``fashion-clip``, so it runs offline.

    scorer = ClipScorer()                      # fashion-clip
    scorer.score(images_uint8, prompts)        # [N, H, W] or [N, C, H, W] uint8, N strings -> float
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["ClipScorer", "clip_score"]


def _tensor(output: Any) -> torch.Tensor:
    """transformers 5 returns model outputs from ``get_*_features``; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP score of images against prompts with one ``(CLIPModel, CLIPProcessor)`` pair."""

    def __init__(self, model: Any = None, processor: Any = None) -> None:
        if model is None or processor is None:
            from ..pipelines.fashion_clip import load_fashion_clip

            model, processor = load_fashion_clip()
        self.model, self.processor = model.eval(), processor

    @torch.inference_mode()
    def per_image(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``[N]`` scores: images uint8 ``[N, H, W]`` (grey) or ``[N, C, H, W]``."""
        if len(images) != len(prompts):
            raise ValueError(f"prompts: need one per image ({len(images)}); got {len(prompts)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8; got {images.dtype}")
        images = images.unsqueeze(1) if images.ndim == 3 else images
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        image_emb = _tensor(self.model.get_image_features(pixel_values=pixels))
        text_emb = _tensor(self.model.get_text_features(input_ids=text["input_ids"],
                                                        attention_mask=text["attention_mask"]))
        return 100 * torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1).clamp(min=0)

    def score(self, images: torch.Tensor, prompts: Sequence[str], batch: int = 250) -> float:
        """The mean CLIP score over all images."""
        scores = [self.per_image(images[i:i + batch], prompts[i:i + batch]) for i in range(0, len(images), batch)]
        return torch.cat(scores).mean().item()


def clip_score(images: torch.Tensor, prompts: Sequence[str], scorer: Optional[ClipScorer] = None) -> float:
    """Mean CLIP score of uint8 images against their prompts (default model: fashion-clip)."""
    return (scorer or ClipScorer()).score(images, prompts)
