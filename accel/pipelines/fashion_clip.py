"""The built-in text-image model: a small transformers ``CLIPModel`` trained on Fashion-MNIST
images and their captions, with its ``CLIPProcessor`` (own tokenizer vocabulary, grey images
converted to RGB). Saved with ``save_pretrained`` in ``assets/fashion-clip``; made by
``scripts/train_fashion_clip.py``. Used for CLIP scores and as the SD pipeline's text encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .data import ASSETS, FASHION_CLASSES, prompt_for
from .fashion_vit import FASHION_MEAN, FASHION_STD

__all__ = ["CAPTION_TEMPLATES", "caption_corpus", "build_fashion_clip", "build_processor",
           "load_fashion_clip", "pixel_values", "zero_shot_logits"]

FASHION_CLIP_DIR = ASSETS / "fashion-clip"
# "a photo of a {name}" is the prompt everywhere; the others teach the text tower some variety.
CAPTION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "{}")
MAX_TOKENS = 16


def caption_corpus() -> List[str]:
    return [t.format(name) for t in CAPTION_TEMPLATES for name in FASHION_CLASSES]


def build_processor():
    """``CLIPProcessor``: 28x28, grey converted to RGB, Fashion-MNIST mean/std on each channel."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from .tokenizer import build_clip_tokenizer

    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 28}, do_center_crop=True, crop_size={"height": 28, "width": 28},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[FASHION_MEAN] * 3,
        image_std=[FASHION_STD] * 3, do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer(caption_corpus(), MAX_TOKENS))


def build_fashion_clip(vocab_size: int, width: int = 128, layers: int = 4, heads: int = 4, projection: int = 64):
    """The architecture with fresh weights (seed with ``torch.manual_seed`` first)."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    text = dict(common, vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    vision = dict(common, image_size=28, patch_size=4, num_channels=3)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    return CLIPModel(config)


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> ``[N, 3, 28, 28]``: what the processor makes of 28x28 grey images."""
    x = (images.float() / 255.0 - FASHION_MEAN) / FASHION_STD
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def load_fashion_clip(folder: Optional[Path] = None) -> Tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` in eval mode, offline."""
    from transformers import CLIPModel, CLIPProcessor

    folder = str(folder or FASHION_CLIP_DIR)
    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


@torch.inference_mode()
def zero_shot_logits(model: Any, tokenizer: Any, images: torch.Tensor,
                     prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``[N, K]`` image-text similarities for the class prompts ("a photo of a {name}")."""
    prompts = list(prompts or [prompt_for(i) for i in range(len(FASHION_CLASSES))])
    text = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixel_values(images))
    return out.logits_per_image
