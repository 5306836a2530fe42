"""One input through the unpatched and the patched model, on the same seed: both outputs, both times,
and the views of what the method did (``views.method_views``). What ``accel demo`` shows.

Several users may call at once while the runs share one model (patched in place for the accelerated
run, so that the views read its state): a lock serialises the runs, so each request gets its own,
unmixed result, and the model is always unpatched between requests.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .evaluation import generate_batch, to_uint8

__all__ = ["Outcome", "SideBySide", "enlarge", "DISPLAY_SIZE"]

DISPLAY_SIZE = 224  # small images (28 px) are enlarged by nearest neighbour to about this size


def enlarge(image: torch.Tensor) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[C, H, W]`` -> uint8 ``[H*k, W*k, 3]`` numpy, k the integer factor that
    brings the width to about ``DISPLAY_SIZE`` (1 for large images): what the demo displays."""
    x = image if image.ndim == 3 else image.unsqueeze(0)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    k = max(1, DISPLAY_SIZE // x.shape[-1])
    x = x.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)
    return x.permute(1, 2, 0).contiguous().numpy()


@dataclass
class Outcome:
    """What one side-by-side run produced: the two outputs (uint8 images, or class probabilities),
    seconds of each call, and the views ``[(caption, uint8 [H, W, 3])]``."""

    baseline: Any
    accelerated: Any
    baseline_s: float
    accelerated_s: float
    views: List[Tuple[str, np.ndarray]] = field(default_factory=list)
    described: Dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.accelerated_s


class SideBySide:
    """Runs models side by side, one request at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def _both(self, model: Any, methods: Dict[str, Any], call: Callable[[Any], Any],
              patched_model: Optional[Any] = None, image: Any = None) -> Outcome:
        """``call(model)`` unpatched, then on ``patched_model`` (default ``model``) with
        ``accel.patch(**methods)`` in place; the views (drawn over ``image`` where they map onto
        it) are read before the patch is removed."""
        from .. import describe, patched
        from .views import method_views

        target = model if patched_model is None else patched_model
        with self.lock:
            start = time.perf_counter()
            baseline = call(model)
            baseline_s = time.perf_counter() - start
            with patched(target, **methods):
                start = time.perf_counter()
                accelerated = call(target)
                accelerated_s = time.perf_counter() - start
                views = method_views(target, image=image)
                described = describe(target)
        return Outcome(baseline, accelerated, baseline_s, accelerated_s, views, described)

    def generate(self, pipe: Any, prompt: str, methods: Dict[str, Any], *, seed: int, steps: int,
                 guidance: Optional[float], postprocess: Callable[[torch.Tensor], torch.Tensor] = to_uint8
                 ) -> Outcome:
        """One image of ``prompt`` (seed ``seed``) from ``pipe`` unpatched and patched with ``methods``."""
        def call(p: Any) -> torch.Tensor:
            return generate_batch(p, [prompt], [seed], steps=steps, guidance=guidance, postprocess=postprocess)[0]

        return self._both(pipe, methods, call)

    def classify(self, model: Any, pixels: torch.Tensor, methods: Dict[str, Any],
                 patched_model: Optional[Any] = None, image: Any = None) -> Outcome:
        """Class probabilities ``[K]`` of one preprocessed image ``pixels [C, H, W]``, unpatched and
        patched (``patched_model``: another base model for the patched side, A-ViT's fine-tune);
        ``image``: the picture itself, for the views."""
        def call(m: Any) -> torch.Tensor:
            with torch.inference_mode():
                return m(pixels.unsqueeze(0)).float().softmax(-1)[0]

        return self._both(model, methods, call, patched_model, image)
