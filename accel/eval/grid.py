"""A labelled image grid as a PNG: one column per setting, one row per prompt.

The layout is fixed by the constants below, so the output size is known in advance:
``width = LEFT_MARGIN + len(columns) * W * scale`` and
``height = TOP_MARGIN + (TITLE_HEIGHT if title else 0) + N * H * scale``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

__all__ = ["labelled_grid", "LEFT_MARGIN", "TOP_MARGIN", "TITLE_HEIGHT", "FONT_SIZE"]

LEFT_MARGIN = 240   # pixels for the row labels (prompts): "a photo of a ankle boot (seed 9)" fits
TOP_MARGIN = 24     # pixels for the column headers (settings)
TITLE_HEIGHT = 24   # pixels above the headers, only when a title is given
FONT_SIZE = 12
PAD = 4             # text inset from a margin's edges
ELLIPSIS = "..."    # ASCII: the bitmap fallback font has no U+2026


def _as_rgb(name: str, images: Any) -> torch.Tensor:
    """``[N, H, W]`` or ``[N, C, H, W]`` (C in 1, 3) uint8 -> ``[N, H, W, 3]`` uint8 on the CPU."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"labelled_grid: columns[{name!r}] must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"labelled_grid: columns[{name!r}] must be uint8 images, got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"labelled_grid: columns[{name!r}] must be [N, H, W] or [N, C, H, W] with C in (1, 3), "
                         f"got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu()


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1, with FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: float) -> str:
    """``text``, cut with an ellipsis so that it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + ELLIPSIS, font=font) > width:
        text = text[:-1]
    return text + ELLIPSIS if text else ""


def _text_height(draw: Any, font: Any) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    return bottom


def labelled_grid(columns: Dict[str, torch.Tensor], path: Union[str, Path], *, row_labels: Sequence[str],
                  scale: int = 2, title: Optional[str] = None) -> Path:
    """Write a PNG grid of images with labelled rows and columns; return its path.

    columns: header -> uint8 images ``[N, H, W]`` (grey) or ``[N, C, H, W]`` (C in 1, 3), every
        column the same N, H, W; grey and colour columns may mix (all drawn as RGB).
    row_labels: N labels, one per image index (the prompts), cut with an ellipsis to fit.
    scale: each cell is upscaled by this integer factor, nearest neighbour.
    """
    from PIL import Image, ImageDraw

    if not columns:
        raise ValueError("labelled_grid: columns is empty")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"labelled_grid: scale must be a positive int, got {scale!r}")
    cells = {name: _as_rgb(name, images) for name, images in columns.items()}
    shapes = {name: tuple(images.shape[:3]) for name, images in cells.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"labelled_grid: columns differ in [N, H, W]: {shapes}")
    n, h, w = next(iter(shapes.values()))
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"labelled_grid: columns hold no images ([N, H, W] = {[n, h, w]})")
    if len(row_labels) != n:
        raise ValueError(f"labelled_grid: row_labels has {len(row_labels)} labels for {n} images per column")

    ch, cw = h * scale, w * scale
    top = TOP_MARGIN + (TITLE_HEIGHT if title else 0)
    canvas = torch.full((top + n * ch, LEFT_MARGIN + len(cells) * cw, 3), 255, dtype=torch.uint8)
    for j, images in enumerate(cells.values()):
        big = images.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # [N, ch, cw, 3]
        canvas[top:, LEFT_MARGIN + j * cw: LEFT_MARGIN + (j + 1) * cw] = big.reshape(n * ch, cw, 3)
    image = Image.fromarray(canvas.numpy())  # [height, width, 3] uint8: RGB

    draw, font = ImageDraw.Draw(image), _font(FONT_SIZE)
    text_h = _text_height(draw, font)
    if title:
        text = _fit(draw, title, font, image.width - 2 * PAD)
        draw.text(((image.width - draw.textlength(text, font=font)) / 2, (TITLE_HEIGHT - text_h) / 2), text,
                  fill="black", font=font)
    for j, name in enumerate(cells):
        text = _fit(draw, str(name), font, cw - 2 * PAD)
        x = LEFT_MARGIN + j * cw + (cw - draw.textlength(text, font=font)) / 2
        draw.text((x, top - TOP_MARGIN + (TOP_MARGIN - text_h) / 2), text, fill="black", font=font)
    for i, label in enumerate(row_labels):
        text = _fit(draw, str(label), font, LEFT_MARGIN - 2 * PAD)
        draw.text((PAD, top + i * ch + (ch - text_h) / 2), text, fill="black", font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
