"""Speculative decoding for transformers causal LMs (Leviathan et al., ICML 2023).

``accel.patch(model, speculative=draft)`` (or ``speculative="prompt_lookup"``) makes
``model.generate`` draft and verify; the algorithm is ``accel.llm.speculative``. Reachable as
``accel.speculative``: the config ``Speculative``.
"""
from __future__ import annotations

from ..registry import Method
from .config import Speculative
from .transformers import SpeculativeCausalLM

METHOD = Method("speculative", Speculative, (SpeculativeCausalLM,), package=__name__)

__all__ = ["METHOD", "Speculative"]
