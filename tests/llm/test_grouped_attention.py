"""Grouped-query attention over a few masked queries without repeating the KV cache: equal to
``scaled_dot_product_attention`` over the repeated key-value heads (float64), and the switch of a
transformers model's ``sdpa`` attention to it and back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel.llm import grouped_attention
from accel.llm.grouped_attention import ATTENTION_NAME, grouped_query_attention, grouped_query_sdpa


def reference(query, key, value, mask):
    group = query.shape[1] // key.shape[1]
    if mask is None:  # the queries are the last positions: each sees everything up to itself
        length, span = query.shape[2], key.shape[2]
        mask = torch.ones(length, span, dtype=torch.bool).tril(span - length)
    return F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 2), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["padding", "none", "additive"])
def test_grouped_query_sdpa_is_sdpa_over_repeated_heads(heads, kv_heads, mask_kind):
    g = torch.Generator().manual_seed(0)
    batch, length, span, dim = 3, 4, 11, 8
    query = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    key, value = (torch.randn(batch, kv_heads, span, dim, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if mask_kind != "none":
        mask = torch.ones(batch, 1, length, span, dtype=torch.bool).tril(span - length)
        mask[0, :, :, :3] = False  # a left-padded row
        mask[2, :, :, 5] = False   # a hole (a rejected draft)
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(grouped_query_sdpa(query, key, value, mask), reference(query, key, value, mask),
                               rtol=0, atol=1e-12)


def test_grouped_query_sdpa_refuses_shapes_it_cannot_group():
    query = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of key-value heads"):
        grouped_query_sdpa(query, torch.zeros(1, 3, 5, 8), torch.zeros(1, 3, 5, 8), None)
    with pytest.raises(ValueError, match="mask must be"):
        grouped_query_sdpa(query, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), torch.ones(1, 4, 2, 5).bool())


def causal_lm(attention="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attention)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().double()


def test_a_models_passes_inside_are_its_own_and_use_the_grouped_attention(monkeypatch):
    """A left-padded batch's prompt pass, then a pass of three more tokens on its cache: the same
    logits inside as outside (float64), the grouped path taken for every layer's masked pass of
    several queries, and the model's attention implementation as it was afterwards."""
    model = causal_lm()
    calls = []
    monkeypatch.setattr(grouped_attention, "grouped_query_sdpa",
                        lambda *args, **kw: calls.append(args[0].shape) or grouped_query_sdpa(*args, **kw))
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    more = torch.randint(1, 64, (2, 3), generator=torch.Generator().manual_seed(2))
    whole = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)

    def run():
        with torch.no_grad():
            first = model(ids, attention_mask=mask, use_cache=True)
            second = model(more, attention_mask=whole, cache=first.past_key_values, use_cache=True)
        return first.logits, second.logits

    expected = run()
    with grouped_query_attention(model) as switched:
        assert switched and model.config._attn_implementation == ATTENTION_NAME
        got = run()
    assert model.config._attn_implementation == "sdpa"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert len(calls) == 2 * 2 and all(shape[1] == 6 for shape in calls)  # two layers, both passes masked


def test_other_attention_is_left_alone_and_errors_put_sdpa_back():
    eager = causal_lm("eager")
    with grouped_query_attention(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"
    with grouped_query_attention(torch.nn.Linear(2, 2)) as switched:
        assert not switched
    model = causal_lm()
    with pytest.raises(RuntimeError, match="inside"):
        with grouped_query_attention(model):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    with grouped_query_attention(model, on=False) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"
