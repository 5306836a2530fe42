"""Mixture of Depths (``accel.llm.mod``): a wrapped layer against a token-by-token reference written
here, identity settings against the unwrapped model, exactly k tokens through a layer, decoding with
per-layer caches against the full forward with causal routing (chunked, batched, left padded), the
BCE losses and their gradients, saving, removing and refusing (small seeded float64 Llamas)."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from accel.hooks import hooked_methods
from accel.llm import mod

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)


def llama(layers=2, attention="eager", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, attn_implementation=attention, **SIZE)
    return LlamaForCausalLM(config).double().eval()


def tokens(batch, length, seed=1):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def strong(routers, seed=2, scale=20.0):
    """Routers with weights of order 1 on this model's small hidden states: f's contribution shows,
    and about half of the tokens are chosen causally."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in routers.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (scale if name.endswith("weight") else 0.1))
    return routers


def unit(routers):
    """w = 1 for every token, and every token chosen causally (router and predictor logits 1)."""
    with torch.no_grad():
        for router in routers.routers.values():
            for linear in (router.router, router.predictor[2]):
                linear.weight.zero_()
                linear.bias.fill_(1.0)
    return routers


def untouched(model):
    return not any(hooked_methods(m) for m in model.modules())


# -- the wrapped layer against a reference --------------------------------------------------------


def rope(v, position, dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # in float32, as the model
    angles = torch.tensor([float(position)]) * inv_freq
    cos, sin = torch.cat([angles, angles]).cos().double(), torch.cat([angles, angles]).sin().double()
    return v * cos + torch.cat([-v[..., dim // 2:], v[..., :dim // 2]], dim=-1) * sin


def rms(v, norm):
    v = v.float()  # the model normalises in float32
    return norm.weight * (v * torch.rsqrt(v.pow(2).mean() + norm.variance_epsilon)).double()


def reference_layer(layer, router, x, capacity, theta, sigmoid=False, float32_softmax=False):
    """One row x [T, C] through a MoD layer, token by token: the top-k tokens by r in their order,
    each attending to the earlier chosen ones at its original position; x + w·f for them, w = r or
    sigmoid(r). (Eager attention takes its softmax in float32.)"""
    T = x.shape[0]
    attn, heads, groups, dim = layer.self_attn, 4, 2, 8
    r = x @ router.weight[0] + router.bias[0]
    chosen = sorted(r.topk(math.ceil(capacity * T)).indices.tolist())
    out, keys, values = x.clone(), [], []
    for i in chosen:
        h = rms(x[i], layer.input_layernorm)
        q = rope((h @ attn.q_proj.weight.T).view(heads, dim), i, dim, theta)
        keys.append(rope((h @ attn.k_proj.weight.T).view(groups, dim), i, dim, theta))
        values.append((h @ attn.v_proj.weight.T).view(groups, dim))
        mixed = []
        for head in range(heads):
            g = head // (heads // groups)
            scores = torch.stack([q[head] @ k[g] for k in keys]) * dim ** -0.5
            p = torch.softmax(scores.float(), dim=0).double() if float32_softmax else torch.softmax(scores, dim=0)
            mixed.append(sum(p[j] * values[j][g] for j in range(len(keys))))
        x1 = x[i] + torch.cat(mixed) @ attn.o_proj.weight.T
        h2 = rms(x1, layer.post_attention_layernorm)
        mlp = layer.mlp
        x2 = x1 + (F.silu(h2 @ mlp.gate_proj.weight.T) * (h2 @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        out[i] = x[i] + (torch.sigmoid(r[i]) if sigmoid else r[i]) * (x2 - x[i])
    return out, chosen


def layer_io(layer):
    """Records the input and output of ``layer`` (as the model calls it)."""
    seen = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]),
                                               with_kwargs=True),
               layer.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))]
    return seen, handles


@pytest.mark.parametrize("attention,wrapped,weight", [("eager", 0, "router"), ("sdpa", 1, "router"),
                                                      ("sdpa", 0, "sigmoid"), ("eager", 1, "sigmoid")])
def test_a_wrapped_layer_equals_the_token_by_token_reference(attention, wrapped, weight):
    model = llama(2, attention)
    routers = strong(mod.wrap(model, layers=[wrapped], capacity=0.5, weight=weight))
    layer = model.model.layers[wrapped]
    seen, handles = layer_io(layer)
    model(tokens(2, 9))
    for h in handles:
        h.remove()
    theta = model.config.rope_parameters["rope_theta"]
    for row in range(2):
        want, chosen = reference_layer(layer, routers.routers[str(wrapped)].router, seen["x"][row], 0.5, theta,
                                       sigmoid=weight == "sigmoid", float32_softmax=attention == "eager")
        assert len(chosen) == 5
        torch.testing.assert_close(seen["y"][row], want, rtol=0, atol=1e-10)
        moved = (want - seen["x"][row]).abs().amax(dim=1)
        assert (moved[chosen] > 1e-4).all()  # the block's contribution is visible, not ~0


# -- identity settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_capacity_one_with_unit_weights_is_the_unwrapped_model(attention, padded):
    model = llama(4, attention)
    if padded and attention == "eager":  # float64 eager gives NaN at left padding in transformers itself
        model = model.float()
    ids = tokens(3, 8)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
    want = model(ids, attention_mask=mask).logits
    unit(mod.wrap(model, layers=[0, 2, 3], capacity=1.0))
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    tolerance = 1e-12 if got.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=tolerance)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_decoding_with_every_token_chosen_is_the_unwrapped_model(attention):
    """Layer 0 wrapped: the shared cache's length (positions, mask sizes) must still be the sequence's."""
    model = llama(3, attention)
    ids = tokens(1, 6)
    want = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    unit(mod.wrap(model, layers=[0, 2], capacity=0.25))
    got = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=0, atol=1e-12)


# -- exactly k tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("length,capacity,k", [(8, 0.125, 1), (10, 0.3, 3), (7, 0.5, 4), (5, 1.0, 5), (3, 0.01, 1)])
def test_the_layer_runs_on_exactly_k_tokens_and_the_others_pass_bit_for_bit(length, capacity, k):
    model = llama(2)
    strong(mod.wrap(model, layers=[1], capacity=capacity))
    layer = model.model.layers[1]
    widths = []
    handles = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["hidden_states"].shape[1]),
                                                         with_kwargs=True),
               layer.mlp.register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))]
    seen, more = layer_io(layer)
    with torch.inference_mode():
        model(tokens(2, length))
    for h in handles + more:
        h.remove()
    assert widths == [k, k]
    x, y = seen["x"], seen["y"]
    for row in range(2):
        chosen = y[row].ne(x[row]).any(dim=1)
        assert int(chosen.sum()) == k
        assert torch.equal(y[row][~chosen], x[row][~chosen])


# -- decoding -------------------------------------------------------------------------------------


def causal(model, layers=(0, 2), decode_by="predictor", seed=2):
    routers = strong(mod.wrap(model, layers=list(layers), capacity=0.25, decode_by=decode_by), seed=seed)
    routers.routing = "causal"
    return routers


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("decode_by", ["predictor", "router"])
def test_decoding_token_by_token_and_in_chunks_equals_the_causal_full_forward(attention, decode_by):
    model = llama(3, attention)
    routers = causal(model, decode_by=decode_by)
    ids = tokens(1, 12)
    full = model(ids).logits
    for i, record in routers.records.items():
        assert 0 < int(record.selected.sum()) < 12, i  # some tokens skip the layer, some run it
    cache = DynamicCache(config=model.config)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(12)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)
    cache = DynamicCache()
    chunks = torch.cat([model(ids[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 6), (6, 12)]], dim=1)
    torch.testing.assert_close(chunks, full, rtol=0, atol=1e-10)


def test_skipped_tokens_write_no_keys_to_the_layers_own_cache():
    model = llama(3)
    routers = causal(model)
    ids = tokens(1, 12)
    model(ids)
    selected = {i: r.selected[0] for i, r in routers.records.items()}
    chosen = {i: int(s.sum()) for i, s in selected.items()}
    ran = []
    handle = model.model.layers[2].mlp.register_forward_pre_hook(lambda m, a: ran.append(a[0].shape[1]))
    cache = DynamicCache(config=model.config)
    for t in range(12):
        model(ids[:, t:t + 1], cache=cache)
    handle.remove()
    for i in (0, 2):
        kv = routers.kv_cache(cache, i)
        assert len(kv) == chosen[i] < 12
        assert kv.keys.shape == (1, 2, chosen[i], 8) and kv.ok.all()
        assert kv.slots[0].tolist() == selected[i].nonzero().flatten().tolist()
    assert sum(ran) == chosen[2]
    assert cache.get_seq_length() == 12 and cache.layers[1].keys.shape[-2] == 12  # the shared cache's length


def test_generate_greedy_equals_the_causal_full_forward():
    model = llama(3, "sdpa")
    causal(model)
    ids = tokens(1, 5)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences).logits[0, 4:-1]
    torch.testing.assert_close(torch.cat(out.logits), full.float(), rtol=0, atol=1e-6)  # generate's are float32
    assert torch.equal(out.sequences[0, 5:], full.argmax(-1))
    again = model.generate(ids, max_new_tokens=8, do_sample=False)  # a new generate starts fresh caches
    assert torch.equal(again, out.sequences)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_left_padded_batch_equals_each_row_alone(attention):
    model = llama(3, attention)
    routers = causal(model)
    rows = [tokens(1, 7, seed=3)[0], tokens(1, 4, seed=4)[0], tokens(1, 6, seed=5)[0]]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 7 - len(row):], mask[b, 7 - len(row):] = row, 1
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], **kwargs)
        assert torch.equal(batch.sequences[b, 7:], alone.sequences[0, len(row):])
        torch.testing.assert_close(torch.stack(batch.logits)[:, b], torch.stack(alone.logits)[:, 0], rtol=0, atol=1e-6)
    if attention == "eager":
        return  # a float64 eager forward gives NaN at left padding in transformers itself (its mask turns -inf)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate makes them: RoPE's float32 angles shift otherwise
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    assert not routers.records[0].selected[mask == 0].any()  # padding never runs a layer
    new = batch.sequences[:, 7:]
    cache = DynamicCache()
    steps = [model(ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]]
    for t in range(new.shape[1] - 1):  # decoding by hand, in float64
        mask, positions = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1), positions[:, -1:] + 1
        steps.append(model(new[:, t:t + 1], attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1])
    for b, row in enumerate(rows):
        alone = model(torch.cat([row, new[b]])[None]).logits[0]
        torch.testing.assert_close(full[b, 7 - len(row):], alone[:len(row)], rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.stack(steps)[:, b], alone[len(row) - 1:-1], rtol=0, atol=1e-10)
    assert not all(routers.kv_cache(cache, i).ok.all() for i in (0, 2))  # rows chose differently: holes


def test_a_cache_changed_or_filled_elsewhere_is_refused():
    model = llama(3)
    causal(model)
    ids = tokens(1, 6)
    cache = DynamicCache()
    model(ids, cache=cache)
    cache.crop(-2)
    with pytest.raises(RuntimeError, match="reordered or cropped"):
        model(ids[:, :1], cache=cache)
    filled = model(ids, use_cache=True).cache  # a forward without a cache given routes by top-k
    with pytest.raises(RuntimeError, match="did not route causally"):
        model(ids[:, :1], cache=filled)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_decode_as_their_causal_full_forward(family):
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, attn_implementation="sdpa", **SIZE))
    else:
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=3, sliding_window=None, attn_implementation="sdpa",
                                                 **SIZE))
    model = model.double().eval()
    causal(model, layers=(1,))
    ids = tokens(1, 8)
    full = model(ids).logits
    cache = DynamicCache()
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(8)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


# -- losses ---------------------------------------------------------------------------------------


def test_half_precision_and_inference_mode():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, attn_implementation="eager", **SIZE)).bfloat16().eval()
    routers = strong(mod.wrap(model, layers=[0, 2], capacity=0.25))
    assert all(p.dtype == torch.bfloat16 for p in routers.parameters())
    with torch.inference_mode():
        assert model(tokens(2, 8)).logits.isfinite().all()
        out = model.generate(tokens(2, 5), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)


def test_the_bce_targets_are_top_k_membership_and_the_loss_is_their_sum():
    model = llama(3)
    routers = strong(mod.wrap(model, layers=[1, 2], capacity=0.25))
    inputs = {}
    handles = [model.model.layers[i].register_forward_pre_hook(
        lambda m, a, k, i=i: inputs.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True) for i in (1, 2)]
    model(tokens(2, 10))
    for h in handles:
        h.remove()
    want = 0.0
    for i in (1, 2):
        router = routers.routers[str(i)]
        r = router.router(inputs[i]).squeeze(-1)
        target = torch.zeros(2, 10, dtype=torch.bool)
        target[torch.arange(2)[:, None], r.topk(3, dim=1).indices] = True  # ceil(0.25 * 10) = 3
        record = routers.records[i]
        assert torch.equal(record.target, target) and torch.equal(record.selected, target)
        p = router.predictor(inputs[i]).squeeze(-1)
        want = want + 0.25 * F.binary_cross_entropy_with_logits(r, target.double()) + \
            F.binary_cross_entropy_with_logits(p, target.double())
    torch.testing.assert_close(routers.aux_loss(router_weight=0.25), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="router_weight"):
        routers.aux_loss(router_weight=-1.0)
    routers.routing = "causal"
    model(tokens(2, 10))
    assert (routers.records[1].target.sum(dim=1) == 3).all()  # still top-k, whatever ran the layer


def test_gradients_reach_the_routers_and_the_predictor_loss_stays_out_of_the_model():
    model = llama(2)
    model.train()
    routers = strong(mod.wrap(model, layers=[1], capacity=0.5))
    router = routers.routers["1"]
    ids = tokens(2, 8)
    model(ids, labels=ids).loss.backward()  # the LM loss reaches the router through w·f
    assert router.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in router.predictor.parameters())
    model.zero_grad(set_to_none=True)
    routers.zero_grad(set_to_none=True)
    model(ids)
    routers.losses()[1]["predictor"].backward()  # stop-gradient: the predictor alone learns from it
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.predictor.parameters())
    assert all(p.grad is None for p in model.parameters())
    model(ids)
    routers.aux_loss().backward()
    assert router.router.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad is not None  # the router's BCE reaches its input, as in the paper


def test_predictor_agreement_against_a_hand_count():
    logits = torch.tensor([[1.0, -2.0, 0.5, -0.1], [0.2, 0.3, -1.0, 2.0]])
    target = torch.tensor([[True, False, False, True], [True, False, False, True]])
    assert mod.predictor_agreement(logits, target) == 5 / 8  # decisions T F T F / T T F T
    valid = torch.tensor([[True, True, False, True], [False, True, True, True]])
    assert mod.predictor_agreement(logits, target, valid) == 4 / 6
    model = llama(2)
    routers = strong(mod.wrap(model, layers=[1], capacity=0.5))
    model(tokens(2, 10))
    record = routers.records[1]
    hand = sum(int((record.predictor_logits[b, t] > 0) == record.target[b, t]) for b in range(2) for t in range(10))
    assert routers.agreement() == {1: hand / 20}
    hand = sum(int((record.router_logits[b, t] > 0) == record.target[b, t]) for b in range(2) for t in range(10))
    assert routers.agreement(by="router") == {1: hand / 20}


# -- saving, removing, copying --------------------------------------------------------------------


def test_routers_save_and_load_and_live_outside_the_model(tmp_path):
    model = llama(3)
    keys = list(model.state_dict())
    routers = strong(mod.wrap(model, layers=[0, 2]))
    assert list(model.state_dict()) == keys
    assert all(p.dtype == torch.float64 for p in routers.parameters())
    assert sorted(routers.state_dict()) == sorted(f"routers.{i}.{p}" for i in (0, 2) for p in (
        "router.weight", "router.bias", "predictor.0.weight", "predictor.0.bias", "predictor.2.weight",
        "predictor.2.bias"))
    ids = tokens(1, 8)
    want = model(ids).logits
    mod.save_routers(routers, tmp_path / "r.safetensors")
    other = llama(3)
    loaded = mod.wrap(other, layers=[0, 2], seed=7)
    assert not torch.equal(other(ids).logits, want)
    mod.load_routers(loaded, tmp_path / "r.safetensors")
    assert torch.equal(other(ids).logits, want)
    with pytest.raises(ValueError, match=r"layers \[0,2\]"):
        mod.load_routers(mod.wrap(llama(3), layers=[1]), tmp_path / "r.safetensors")


def test_remove_restores_the_model_bit_for_bit_and_copies_stay_wrapped():
    model = llama(3)
    ids = tokens(2, 8)
    want = model(ids).logits
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    routers = strong(mod.wrap(model, layers=[1, 2]))
    wrapped = model(ids).logits
    assert not torch.equal(wrapped, want)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    routers.remove()
    assert untouched(model)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    assert torch.equal(model(ids).logits, want)
    assert torch.equal(twin(ids).logits, wrapped) and torch.equal(loaded(ids).logits, wrapped)
    mod.wrap(model, layers=[1])  # and it can be wrapped again


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(capacity=0), ValueError, r"capacity must be a float in \(0, 1\]"),
    (dict(capacity=1.5), ValueError, "capacity"),
    (dict(capacity="half"), TypeError, "capacity"),
    (dict(capacity=True), TypeError, "capacity"),
    (dict(layers=[3]), ValueError, r"layers must be ints in \[0, 3\)"),
    (dict(layers=[1, 1]), ValueError, "must not repeat"),
    (dict(layers=[0.5]), TypeError, "layers"),
    (dict(layers=[]), TypeError, "non-empty list"),
    (dict(layers=1), TypeError, "layers"),
    (dict(weight="relu"), ValueError, "weight must be one of 'router', 'sigmoid'"),
    (dict(decode_by="oracle"), ValueError, "decode_by must be one of 'predictor', 'router'"),
    (dict(routing="random"), ValueError, "routing must be one of 'top_k', 'causal'"),
])
def test_bad_settings_are_refused_by_name_before_anything_changes(kwargs, error, match):
    model = llama(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(layers=[1], capacity=0.5)
    settings.update(kwargs)
    with pytest.raises(error, match=match):
        mod.wrap(model, **settings)
    assert untouched(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_models_and_a_second_wrap_are_refused():
    with pytest.raises(TypeError, match="no decoder layers at model.model.layers"):
        mod.wrap(torch.nn.Linear(4, 4), layers=[0])
    model = llama(3)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(TypeError, match="'flex_attention' is not supported; supported: 'eager', 'sdpa'"):
        mod.wrap(model, layers=[0])
    assert untouched(model)
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=16, **SIZE))
    with pytest.raises(TypeError, match="sliding_attention; supported: full-attention"):
        mod.wrap(sliding, layers=[1])
    assert untouched(sliding)
    model = llama(3)
    routers = mod.wrap(model, layers=[0])
    with pytest.raises(ValueError, match="already wrapped"):
        mod.wrap(model, layers=[2])
    assert [i for i, layer in enumerate(model.model.layers) if hooked_methods(layer)] == [0]
    model(tokens(1, 4))
    assert list(routers.records) == [0]
