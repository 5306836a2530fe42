"""The three small language models of the dense / MoE / MoD study, trained by the project on the
Python documentation (``scripts/train_llm_study.py``; figures in docs/benchmarks.md).

    model, tokenizer = accel.pipelines.load("study-dense")    # or "study-moe", "study-mod"

All three share one Llama shape (``study_config``: 6 layers, width 192, 6 query and 2 key-value
heads, tied embeddings, a 4,096-token byte-level BPE trained on the same text) and differ where
the papers put their changes:
- ``dense``: SwiGLU MLPs of width 512;
- ``moe``: every MLP a ``accel.llm.moe.MoEBlock`` of 8 experts of width 256, top-2 (renormalised
  softmax), so a token's active parameters equal the dense model's (Switch-style load-balancing
  loss in training);
- ``mod``: the dense model with Mixture of Depths (``accel.llm.mod``) on every other layer (1, 3,
  5) at 12.5% capacity; its routers and causal predictors are kept apart from the backbone.

``forward_flops`` counts what a forward pass computes (matrix products and attention, as
multiply-adds times 2), the study's x-axis.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch

__all__ = ["ARCHS", "ASSET_DIR", "MOD_CAPACITY", "MOD_LAYERS", "build", "forward_flops", "heldout_tokens",
           "load_study_model", "special_tokens", "study_config"]

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "llm-study"
ARCHS = ("dense", "moe", "mod")
MOE_EXPERTS, MOE_TOP_K, MOE_WIDTH = 8, 2, 256
MOD_LAYERS, MOD_CAPACITY = (1, 3, 5), 0.125


def study_config(vocab_size: int = 4096, **overrides: Any) -> Any:
    """The shared Llama configuration (transformers ``LlamaConfig``)."""
    from transformers import LlamaConfig

    settings: Dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=192, intermediate_size=512,
                                    num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                                    max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    settings.update(overrides)
    return LlamaConfig(**settings)


def build(arch: str, config: Any, seed: int = 0) -> Tuple[Any, Any]:
    """``(model, routers)``: a freshly initialised (seeded) study model; ``routers`` is the MoD
    routers' module for ``"mod"`` and None otherwise."""
    from transformers import LlamaForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    routers = None
    if arch == "moe":
        from ..llm.moe import MoEBlock

        for layer in model.model.layers:
            layer.mlp = MoEBlock(config.hidden_size, MOE_WIDTH, MOE_EXPERTS, MOE_TOP_K, act=layer.mlp.act_fn)
    elif arch == "mod":
        from ..llm import mod

        routers = mod.wrap(model, layers=list(MOD_LAYERS), capacity=MOD_CAPACITY, seed=seed)
    return model, routers


def forward_flops(arch: str, config: Any, seq_len: int) -> float:
    """FLOPs per token of a forward pass over sequences of ``seq_len`` tokens (2 per multiply-add):
    the linear layers a token goes through, the output layer, and causal attention (scores and
    weighted values over the ``(n + 1) / 2`` positions a token sees on average in a sequence of
    ``n``). MoD layers compute for ``capacity`` of the tokens, which attend among themselves; the
    routers and predictors are counted too."""
    from ..llm.mod import predictor_width

    width, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = width // heads
    attn_proj = width * (heads * head_dim) * 2 + width * (kv * head_dim) * 2  # q, o and k, v
    mlp = 3 * width * config.intermediate_size
    if arch == "moe":
        mlp = width * MOE_EXPERTS + MOE_TOP_K * 3 * width * MOE_WIDTH
    total = 0.0
    for index in range(config.num_hidden_layers):
        routed = arch == "mod" and index in MOD_LAYERS
        n = max(1, math.ceil(MOD_CAPACITY * seq_len - 1e-9)) if routed else seq_len  # tokens running the layer
        seen = (n + 1) / 2  # positions each of them attends to, on average
        total += (n / seq_len) * (2 * (attn_proj + mlp) + 2 * 2 * seen * heads * head_dim)
        if routed:
            total += 2 * (width + width * predictor_width(width) + predictor_width(width))  # router, predictor
    return total + 2 * width * config.vocab_size


def load_study_model(arch: str, folder: Path = ASSET_DIR, dtype: torch.dtype = torch.float32) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` of the shipped ``arch`` model, in eval mode. The MoD model comes wrapped,
    its routers and predictors loaded (``accel.llm.mod.routers_of(model)``)."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    where = folder / arch
    if not (where / "model.safetensors").is_file():
        raise FileNotFoundError(f"study-{arch}: no weights in {where}; train them with scripts/train_llm_study.py")
    settings = json.loads((where / "config.json").read_text())
    model, routers = build(arch, study_config(**settings["config"]))
    missing, unexpected = model.load_state_dict(load_file(str(where / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the output layer is the embeddings, tied
        raise ValueError(f"study-{arch}: {where / 'model.safetensors'} does not fit the model: missing "
                         f"{sorted(set(missing) - {'lm_head.weight'})}, unexpected {sorted(unexpected)}")
    if routers is not None:
        from ..llm import mod

        mod.load_routers(routers, where / "routers.safetensors")
        routers.to(dtype).eval()
    pad, bos, eos, unk = special_tokens()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=bos, eos_token=eos,
                                        pad_token=pad, unk_token=unk)
    return model.to(dtype).eval(), tokenizer


def heldout_tokens(folder: Path = ASSET_DIR) -> torch.Tensor:
    """The first held-out tokens of the study's text (files no model trained on), shipped with the
    models: a 1-D int16 tensor."""
    from safetensors.torch import load_file

    return load_file(str(folder / "heldout.safetensors"))["ids"]


def special_tokens() -> Sequence[str]:
    """The tokenizer's special tokens, in id order (pad 0, bos 1, eos 2, unk 3)."""
    return ("<pad>", "<s>", "</s>", "<unk>")
