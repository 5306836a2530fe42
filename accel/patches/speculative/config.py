"""Settings of speculative decoding and the shorthand values ``accel.patch(..., speculative=...)`` accepts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..settings import Settings, check_bool, check_choice, check_int, check_real

__all__ = ["Speculative"]


def is_causal_lm(obj: Any) -> bool:
    """A transformers model that generates (``GenerationMixin``) and has a config."""
    return callable(obj) and callable(getattr(obj, "generate", None)) and hasattr(obj, "config")


def can_draft(obj: Any) -> bool:
    """A draft causal LM or an EAGLE head."""
    from ...llm.eagle import EagleHead

    return is_causal_lm(obj) or isinstance(obj, EagleHead)


@dataclass(frozen=True, eq=False)
class Speculative(Settings):
    """Speculative decoding for a transformers causal LM (Leviathan et al. 2023): ``generate`` drafts
    ``num_draft_tokens`` tokens with a cheap proposer and keeps those the model agrees with, checked
    in one forward pass. Greedy output is the model's own, token for token; sampled output has the
    model's own distribution.

    draft: a transformers causal LM sharing the model's tokenizer (vocabulary checked), an
        ``accel.llm.eagle.EagleHead`` made for the model (width and vocabulary checked), or None.
    prompt_lookup: the longest n-gram of prompt lookup (the tokens that followed the latest earlier
        occurrence of the last n tokens), or None. With a draft too, prompt lookup proposes where an
        n-gram of two tokens or more recurs and the draft elsewhere.
    num_draft_tokens: tokens proposed per verification pass at most, >= 1.
    draft_confidence: adaptive draft length: a draft model stops drafting (for a row) after a token
        it gave a probability below this, in [0, 1); 0 always drafts ``num_draft_tokens``.
    few_rows: on the CPU, the model's linear layers run its passes of a few positions by
        ``accel.kernels.few_rows_linear`` (faster there than ``F.linear``); False keeps ``F.linear``.
    draft_policy: ``"fixed"`` drafts ``num_draft_tokens`` every pass; ``"goodput"`` drafts, each
        pass, the length up to it (0 included) with the most tokens per second measured so far in
        the call (``accel.llm.draft_policy``), so drafting is cut where it costs more than it gains.

    Shorthands: ``speculative=draft_model``; ``speculative="prompt_lookup"`` (3-grams).
    Greedy (the model's own tokens) or sampled with ``do_sample=True`` (the model's own
    distribution), at batch size 1 or on left-padded batches, each row keeping its own count.
    """

    draft: Optional[Any] = None
    prompt_lookup: Optional[int] = None
    num_draft_tokens: int = 4
    draft_confidence: float = 0.0
    few_rows: bool = True
    draft_policy: str = "fixed"

    METHOD = "speculative"
    EXPECTED = "a draft causal LM, an EagleHead, \"prompt_lookup\", or a dict of settings"

    def __post_init__(self) -> None:
        if self.draft is None and self.prompt_lookup is None:
            raise ValueError("Speculative: give a proposer, draft= (a causal LM) and/or prompt_lookup= "
                             "(an n-gram length)")
        if self.draft is not None and not can_draft(self.draft):
            raise TypeError(f"Speculative: draft must be a transformers causal LM (with generate and a config) or "
                            f"an EagleHead; got {type(self.draft).__name__}")
        if self.prompt_lookup is not None:
            object.__setattr__(self, "prompt_lookup", check_int("Speculative", "prompt_lookup", self.prompt_lookup, 1))
        object.__setattr__(self, "num_draft_tokens", check_int("Speculative", "num_draft_tokens",
                                                               self.num_draft_tokens, 1))
        object.__setattr__(self, "draft_confidence", check_real("Speculative", "draft_confidence",
                                                                self.draft_confidence, lambda v: 0 <= v < 1,
                                                                "a float in [0, 1)"))
        object.__setattr__(self, "few_rows", check_bool("Speculative", "few_rows", self.few_rows))
        from ...llm.speculative import DRAFT_POLICIES

        object.__setattr__(self, "draft_policy", check_choice("Speculative", "draft_policy", self.draft_policy,
                                                              DRAFT_POLICIES))

    @classmethod
    def from_shorthand(cls, value: Any) -> Optional[Dict[str, Any]]:
        """``speculative=draft_model`` or ``speculative="prompt_lookup"``."""
        if value == "prompt_lookup":
            return {"prompt_lookup": 3}
        return {"draft": value} if can_draft(value) else None
