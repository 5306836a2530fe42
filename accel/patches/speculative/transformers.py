"""Speculative decoding behind a transformers causal LM's own ``generate``.

``model.generate(input_ids, max_new_tokens=...)`` runs ``accel.llm.speculative`` while the patch
is on: greedy, or sampled with ``do_sample=True`` and generate's temperature, top-k and top-p.
Options it does not serve are refused by name, never ignored: beam search, a streamer, stop
strings, logits processors, repetition penalties, min-p and the other samplers. Batches
(left-padded, with their attention mask) are served, greedy or sampled, each row accepting its own
number of drafted tokens (``accel.llm.speculative_batch``).
The model's own ``generate`` comes back with ``accel.unpatch``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..base import MethodPatch
from .config import Speculative, is_causal_lm

__all__ = ["SpeculativeCausalLM"]

# generate's keyword arguments served here; any other is refused by name
SERVED = {"input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length", "do_sample", "num_beams",
          "eos_token_id", "pad_token_id", "use_cache", "generation_config", "temperature", "top_k", "top_p"}
# generation-config fields whose non-default value changes greedy decoding, which is not served
PROCESSING = {"num_beams": 1, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
              "bad_words_ids": None, "min_new_tokens": None, "min_length": 0, "suppress_tokens": None,
              "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
              "stop_strings": None, "num_return_sequences": 1, "encoder_repetition_penalty": 1.0,
              "sequence_bias": None, "renormalize_logits": False, "exponential_decay_length_penalty": None}


class SpeculativeCausalLM(MethodPatch):
    SUPPORTED = "transformers causal language models (GenerationMixin: Llama, Qwen2, Mistral, ...)"

    def __init__(self, model: Any, config: Speculative) -> None:
        super().__init__(model, config)
        from ...llm.speculative import check_draft

        if config.draft is not None:  # the model as its own draft passes: every token accepted (a check)
            check_draft(config.draft, model, "speculative")

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return is_causal_lm(obj) and callable(getattr(obj, "get_output_embeddings", None))

    def _install(self) -> None:
        self.hooks.add(self.target, self._generate, "generate")
        from ...llm.eagle import EagleHead

        drafter = "an EAGLE head" if isinstance(self.config.draft, EagleHead) else "a draft model"
        proposer = " and ".join(([] if self.config.draft is None else [drafter]) +
                                ([] if self.config.prompt_lookup is None else
                                 [f"prompt lookup ({self.config.prompt_lookup}-grams)"]))
        self.patched_modules["generate"] = f"speculative decoding: {proposer}, {self.config.num_draft_tokens} per pass"

    def _generate(self, model: Any, call_next: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        from ...llm.speculative import speculative_generate

        config = kwargs.get("generation_config") or model.generation_config  # as generate reads it
        input_ids, max_new_tokens, eos = self._request(config, args, kwargs)
        sampler = self._sampler(config, kwargs)
        out = speculative_generate(model, input_ids, draft=self.config.draft, prompt_lookup=self.config.prompt_lookup,
                                   num_draft_tokens=self.config.num_draft_tokens, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos, sampler=sampler, attention_mask=kwargs.get("attention_mask"),
                                   draft_confidence=self.config.draft_confidence, few_rows=self.config.few_rows,
                                   draft_policy=self.config.draft_policy,
                                   pad_token_id=kwargs.get("pad_token_id", getattr(config, "pad_token_id", None)))
        self.state = out.stats
        return out.sequences

    @staticmethod
    def _sampler(config: Any, kwargs: Dict[str, Any]) -> Any:
        """None for greedy decoding; else a ``Sampler`` with generate's temperature, top-k (0: off) and
        top-p, from the call or the generation ``config``, as ``generate`` would take them."""
        from ...llm.speculative import Sampler

        if not kwargs.get("do_sample", getattr(config, "do_sample", False)):
            return None
        setting = {name: kwargs.get(name, getattr(config, name, None)) for name in ("temperature", "top_k", "top_p")}
        return Sampler(temperature=1.0 if setting["temperature"] is None else setting["temperature"],
                       top_k=setting["top_k"] or None, top_p=setting["top_p"])

    @staticmethod
    def _request(config: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[torch.Tensor, int, Any]:
        """The prompt, the number of new tokens and the end tokens of a ``generate`` call under the
        generation ``config`` it uses; a ``ValueError`` naming any option this patch does not serve."""
        if len(args) > 1:
            raise ValueError("speculative: generate takes the prompt as its only positional argument while patched")
        unknown = sorted(set(kwargs) - SERVED - set(PROCESSING))  # the latter: checked for their defaults below
        if unknown:
            raise ValueError(f"speculative: generate option(s) {', '.join(unknown)} are not served by speculative "
                             f"decoding (served: {', '.join(sorted(SERVED))}); unpatch to use them")
        for name, default in PROCESSING.items():
            value = kwargs.get(name, getattr(config, name, default))
            if value != default and value is not None:
                raise ValueError(f"speculative: generate with {name}={value!r} is not served yet (only "
                                 f"{name}={default!r}); unpatch to use it")
        input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
            raise ValueError("speculative: generate needs input_ids, a [batch, length] tensor of token ids")
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if max_new is None:
            max_length = kwargs.get("max_length", getattr(config, "max_length", None) or 20)
            max_new = max_length - input_ids.shape[1]
        if max_new < 1:
            raise ValueError(f"speculative: nothing to generate (max_new_tokens={max_new})")
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        return input_ids, int(max_new), eos

    def last_call(self) -> Optional[Dict[str, Any]]:
        return None if self.state is None else dict(self.state)
