"""The shipped EAGLE draft head for SmolLM2-135M-Instruct, trained by the project.

    head, tokenizer = accel.pipelines.load("smollm2-eagle")
    target, _ = accel.pipelines.load("smollm2-135m")
    accel.patch(target, speculative=head)        # target.generate(...) drafts with the head

One decoder layer that reads the target's own final features (``accel.llm.eagle``) and proposes
over the 8,192 ids the shipped draft model keeps, scored by the target's own output layer. It was
trained by ``scripts/train_smollm2_eagle.py`` on the target's features over the Python 3.11
documentation (Debian's ``python3.11-doc``, PSF licence) and over its own greedy answers to
requests about that text; see ``assets/smollm2-eagle/training.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple

import torch

__all__ = ["ASSET_DIR", "load_smollm2_eagle"]

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "smollm2-eagle"


def load_smollm2_eagle(dtype: torch.dtype = torch.float16, folder: Path = ASSET_DIR) -> Tuple[Any, Any]:
    """``(EagleHead, tokenizer)`` in eval mode, from ``assets/smollm2-eagle``, in ``dtype``.

    float16 by default, the dtype its weights are stored in: drafting reads the head's weights and
    8,192 of the target's output rows from memory at every step, and at half the bytes 4 proposals
    take 3.3 ms instead of 9.6 ms in float32 on the 2-core CPU (``python scripts/bench_llm.py
    --costs``; docs/benchmarks.md). The head casts the target's features to its own dtype; which tokens it proposes may
    change, never the output, which the target decides."""
    from ..llm.eagle import load_eagle_head
    from .smollm2 import load_smollm2_tokenizer

    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"smollm2-eagle: no weights in {folder}; train them with "
                                f"scripts/train_smollm2_eagle.py")
    return load_eagle_head(folder, dtype), load_smollm2_tokenizer()
