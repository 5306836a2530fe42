"""Grouped-query attention for passes of a few queries, without copying the KV cache.

A model with grouped-query attention (Ainslie et al. 2023: SmolLM2 has 9 query heads over 3 key-value
heads) keeps one key and value per group. transformers' ``sdpa`` attention hands a single query to
``scaled_dot_product_attention`` with the groups folded into it, but a pass of several queries with
a mask (speculative decoding's verification, a left-padded batch) gets ``repeat_kv``: every layer
copies its whole KV cache ``heads / kv_heads`` times before attending. For SmolLM2-135M checking
2 positions in each of 8 rows, the pass took 79.0 ms that way and 69.5 ms this way on this
project's CPU (``python scripts/bench_llm.py --costs --batch 8``).

Here the query heads of a group go into the query dimension instead: ``[B, H, q, D]`` is viewed as
``[B, H_kv, (H / H_kv) * q, D]``, the mask repeated to match, and each group's queries read their
own key-value head once. Each query row computes the same dot products and softmax as before (the
order of the sums inside the kernel may differ, as with any change of shape).

    out = grouped_query_sdpa(query, key, value, mask)     # = sdpa over repeated K/V, up to rounding
    with grouped_query_attention(model):                  # a transformers model's sdpa layers use it
        logits = model(input_ids, attention_mask=mask, cache=cache).logits

``grouped_query_attention`` switches a model whose attention is transformers' ``sdpa`` to a name
registered with the same mask function and this attention (which hands every other case, one query
or no mask or no groups, to transformers' own function), and back when the block ends, errors
included. Any other attention implementation is left alone.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["grouped_query_sdpa", "grouped_query_attention", "ATTENTION_NAME"]

ATTENTION_NAME = "accel_grouped_sdpa"


def grouped_query_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                       scale: Optional[float] = None) -> torch.Tensor:
    """``query: [B, H, q, D]``, ``key``/``value: [B, H_kv, S, D]`` (H a multiple of H_kv), ``mask``:
    ``[B or 1, 1, q, S]`` (bool: True attends; or additive float), or None for causal attention of
    the ``q`` queries as the last ``q`` of the ``S`` positions. Returns ``[B, H, q, D]``, as
    ``scaled_dot_product_attention`` over the key/value heads repeated ``H / H_kv`` times."""
    batch, heads, length, dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"grouped_query_sdpa: query heads ({heads}) must be a multiple of key-value heads ({kv_heads})")
    if mask is None:
        mask = torch.ones(length, span, dtype=torch.bool, device=query.device).tril(span - length)[None, None]
    elif mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != length:
        raise ValueError(f"grouped_query_sdpa: mask must be [B or 1, 1, {length}, {span}]; got {list(mask.shape)}")
    group = heads // kv_heads
    packed = query.reshape(batch, kv_heads, group * length, dim)  # a group's heads one after another
    if group > 1:
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, length, dim)


def _attention(sdpa_attention_forward: Any, module: Any, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs: Any
               ) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature after ``sdpa_attention_forward`` (transformers' own,
    bound at registration, so that the per-layer call imports nothing): ``[B, H, q, D]`` in,
    ``[B, q, H, D]`` out."""
    plain = (attention_mask is None or query.shape[2] == 1 or key.shape[1] == query.shape[1] or dropout
             or attention_mask.ndim != 4 or attention_mask.shape[1] != 1
             or any(kwargs.get(option) is not None for option in ("softcap", "position_bias", "s_aux")))
    if plain:  # transformers' function copies nothing in these cases
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = grouped_query_sdpa(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, functools.partial(_attention, sdpa_attention_forward))
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the masks sdpa gets, so the same semantics


@contextlib.contextmanager
def grouped_query_attention(model: Any, on: bool = True) -> Iterator[bool]:
    """While inside, ``model``'s transformers ``sdpa`` attention (every sub-config set to it) runs
    passes of several masked queries by ``grouped_query_sdpa``. Yields whether it switched: False for
    other implementations, models that are not transformers models, or ``on=False``."""
    configs = _sdpa_configs(model) if on else []
    if not configs:
        yield False
        return
    _register()
    try:
        for config in configs:
            config._attn_implementation_internal = ATTENTION_NAME
        yield True
    finally:
        for config in configs:
            config._attn_implementation_internal = "sdpa"


def _sdpa_configs(model: Any) -> list:
    """The configs of ``model`` and its sub-models, if every one of them runs transformers' ``sdpa``."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - the llm extra installs it
        return []
    if not isinstance(model, transformers.PreTrainedModel):
        return []
    configs = list({id(m.config): m.config for m in model.modules()
                    if isinstance(m, transformers.PreTrainedModel)}.values())
    if not all(getattr(c, "_attn_implementation_internal", None) == "sdpa" for c in configs):
        return []
    return configs
