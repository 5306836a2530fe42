"""Continuous batching over the paged KV cache: every request's tokens equal the model's own greedy
``generate`` of that request alone (float64 Llama/Qwen2/Mistral-style models built from configs,
seeded), with mixed prefill and decode, chunked prompts, requests joining mid-run, non-contiguous
block tables, preemption, prefix hits and forks; the packed paged attention against a dense one;
the model left exactly as it was; bad input refused with the model untouched; the benchmark's
smoke run."""
from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accel.llm.batching import ContinuousBatcher, NewToken
from accel.llm.paged_attention import PagedAttentionBinding, PagedBatch, paged_attention
from accel.llm.paged_kv import BlockPool, KVCacheManager, paged_attention_reference

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 96


def causal_lm(kind="llama", seed=0, **extra):
    import transformers

    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=None, pad_token_id=0,
        initializer_range=0.3, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval().double()


def prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def alone(model, prompt, new, eos=None):
    """The model's own greedy generate of one request: its new tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def shuffle_free_list(pool, seed=0):
    """Hand blocks out in a random order, so that block tables are not contiguous."""
    order = pool.free_block_ids()
    random.Random(seed).shuffle(order)
    pool._free = collections.OrderedDict.fromkeys(order)


def run_joining(engine, requests, join_after=2):
    """The first half of ``requests`` ((prompt, max_new_tokens) pairs) added at once, the rest one
    per step after ``join_after`` steps; every request's generated tokens."""
    half = len(requests) // 2
    ids = [engine.add_request(p, k) for p, k in requests[:half]]
    for _ in range(join_after):
        engine.step()
    for p, k in requests[half:]:
        ids.append(engine.add_request(p, k))
        engine.step()
    while engine.has_unfinished():
        engine.step()
    return [engine.outputs(i)[0] for i in ids]


# -- equal to each request alone -----------------------------------------------------------------------
MODELS = {"llama": {}, "qwen2": {}, "mistral": {},
          "mistral, sliding window 5": {"sliding_window": 5},
          "qwen2, second layer sliding 5": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_request_equals_greedy_generate_alone(name):
    """Mixed prompt lengths (1 to 41 tokens; longer than the 16-token budget, so computed in chunks)
    and max_new_tokens, half of the requests joining mid-run, block tables shuffled."""
    model = causal_lm(name.split(",")[0], **MODELS[name])
    requests = list(zip(prompts([5, 17, 41, 1, 30, 9]), [9, 4, 7, 12, 6, 10]))
    with ContinuousBatcher(model, block_size=4, num_blocks=64, max_batch_tokens=16) as engine:
        shuffle_free_list(engine.kv.pool)
        got = run_joining(engine, requests)
        stats = engine.stats()
    assert got == [alone(model, p, k) for p, k in requests]
    assert stats["generated_tokens"] == sum(k for _, k in requests)
    assert stats["forward_calls"] < stats["generated_tokens"]
    assert stats["max_batch_sequences"] >= 4 and stats["max_step_tokens"] == 16
    assert stats["preemptions"] == 0 and stats["used_blocks"] == 0
    # at the peak, each running sequence's blocks held its tokens with less than a block to spare
    held, slots = stats["peak_tokens_held"], stats["peak_used_blocks"] * 4
    assert held <= slots < held + 4 * stats["max_batch_sequences"], (held, slots)


def test_block_tables_are_shuffled_and_the_tokens_the_same():
    model = causal_lm()
    requests = list(zip(prompts([13, 22, 7]), [6, 6, 6]))
    tables = []
    outs = []
    for shuffled in (False, True):
        with ContinuousBatcher(model, block_size=4, num_blocks=32, max_batch_tokens=64) as engine:
            if shuffled:
                shuffle_free_list(engine.kv.pool, seed=3)
            ids = [engine.add_request(p, k) for p, k in requests]
            engine.step()
            tables.append([engine.kv.block_ids((i, 0)) for i in ids])
            while engine.has_unfinished():
                engine.step()
            outs.append([engine.outputs(i)[0] for i in ids])
    assert tables[0] == [list(range(0, 4)), list(range(4, 10)), list(range(10, 12))]
    assert tables[1] != tables[0]
    assert outs[0] == outs[1] == [alone(model, p, k) for p, k in requests]


def test_preemption_under_a_tiny_pool_gives_the_same_tokens():
    """12 blocks of 4 tokens for 5 requests of 17 to 30 tokens in all: the newest are preempted,
    recomputed later, and the tokens are those of each request alone."""
    model = causal_lm("qwen2")
    requests = prompts([9, 14, 6, 11, 3], seed=5)
    with ContinuousBatcher(model, block_size=4, num_blocks=12, max_batch_tokens=24) as engine:
        shuffle_free_list(engine.kv.pool, seed=1)
        got = engine.generate(requests, max_new_tokens=14)
        stats = engine.stats()
    assert got == [alone(model, p, 14) for p in requests]
    assert stats["preemptions"] > 0 and stats["peak_used_blocks"] <= 12
    # Recomputation: more than each prompt once and each generated token but the last as an input.
    assert stats["computed_tokens"] > sum(map(len, requests)) + stats["generated_tokens"] - len(requests)


def test_a_common_prefix_is_computed_once():
    """Requests sharing a 12-token system prefix (3 blocks) reuse its cached blocks, in the step that
    computes them and after the first request has finished."""
    model = causal_lm()
    system = prompts([12], seed=7)[0]
    tails = prompts([3, 6, 5], seed=8)
    with ContinuousBatcher(model, block_size=4, num_blocks=64, max_batch_tokens=64) as engine:
        first = engine.generate([system + tails[0], system + tails[1]], max_new_tokens=5)
        assert engine.stats()["prefix_hits"] == 3                 # the second, in the same step
        later = engine.generate([system + tails[2]], max_new_tokens=5)
        stats = engine.stats()
    assert first + later == [alone(model, system + t, 5) for t in tails]
    assert (stats["prefix_queries"], stats["prefix_hits"]) == (3 + 4 + 4, 6)
    assert stats["computed_tokens"] == sum(len(system + t) for t in tails) - 24 + 3 * 4


def test_cached_prefix_length_changes_nothing():
    kv = KVCacheManager(BlockPool(8, 4, 1, 1, 2))
    kv.allocate("a", list(range(10)))
    before = (kv.pool.free_block_ids(), kv.prefix_queries, kv.prefix_hits)
    assert kv.cached_prefix_length(list(range(10)) + [7]) == 8
    assert kv.cached_prefix_length(list(range(8))) == 4          # the last token is always computed
    assert kv.cached_prefix_length([1, 2, 3]) == 0
    assert (kv.pool.free_block_ids(), kv.prefix_queries, kv.prefix_hits) == before


# -- parallel sampling --------------------------------------------------------------------------------
def test_greedy_parallel_samples_share_the_prompt_and_are_equal():
    model = causal_lm("mistral")
    (prompt,) = prompts([10], seed=2)
    with ContinuousBatcher(model, block_size=4, num_blocks=32, max_batch_tokens=64) as engine:
        rid = engine.add_request(prompt, 6, n=3)
        assert len(engine.step()) == 3                            # the prompt's pass gives 3 first tokens
        tables = [engine.kv.block_ids((rid, i)) for i in range(3)]
        assert tables[0] == tables[1] == tables[2]                # forked: 3 blocks shared
        engine.step()                                             # each copies the shared partial block
        with pytest.raises(ValueError, match="has not finished"):
            engine.release(rid)
        tables = [engine.kv.block_ids((rid, i)) for i in range(3)]
        assert tables[0][:2] == tables[1][:2] == tables[2][:2] and len({t[2] for t in tables}) == 3
        while engine.has_unfinished():
            engine.step()
        stats = engine.stats()
    assert engine.outputs(rid) == [alone(model, prompt, 6)] * 3
    assert stats["computed_tokens"] == len(prompt) + 3 * 5        # the prompt once


def test_sampled_parallel_samples_are_seeded_and_differ():
    model = causal_lm()
    (prompt,) = prompts([7], seed=4)

    def sample(seed, n=3, **options):
        with ContinuousBatcher(model, block_size=4, num_blocks=32) as engine:
            rid = engine.add_request(prompt, 12, n=n, do_sample=True, seed=seed, **options)
            list(engine.stream())
            return engine.outputs(rid)

    first = sample(0, temperature=2.0)
    assert first == sample(0, temperature=2.0) and first != sample(1, temperature=2.0)
    assert len({tuple(s) for s in first}) == 3
    assert sample(0, n=2, top_k=1) == [alone(model, prompt, 12)] * 2


# -- streaming and stopping ----------------------------------------------------------------------------
def test_stream_yields_each_token_as_it_is_produced_and_stops_at_eos():
    model = causal_lm("qwen2")
    requests = prompts([6, 11, 3], seed=9)
    reference = [alone(model, p, 10) for p in requests]
    eos = reference[1][4]                                        # an EOS mid-way through the second request
    with ContinuousBatcher(model, block_size=4, num_blocks=32) as engine:
        ids = [engine.add_request(p, 10, eos_token_id=eos) for p in requests]
        streamed = collections.defaultdict(list)
        for token in engine.stream():
            assert isinstance(token, NewToken) and token.sample == 0
            streamed[token.request_id].append(token.token_id)
            assert token.finished == engine.is_finished(token.request_id)
        assert [streamed[i] for i in ids] == [engine.outputs(i)[0] for i in ids]
        assert engine.release(ids[0]) == [streamed[ids[0]]]          # forgotten once released
        with pytest.raises(ValueError, match="request_id"):
            engine.outputs(ids[0])
    assert [streamed[i] for i in ids] == [alone(model, p, 10, eos=eos) for p in requests]
    assert streamed[ids[1]][-1] == eos and len(streamed[ids[1]]) <= 5


# -- the packed paged attention ------------------------------------------------------------------------
def test_packed_attention_matches_dense_attention_per_sequence():
    """Two decode rows and two prefill chunks (one after earlier tokens) over shuffled blocks:
    each sequence's output equals dense causal SDPA over its own keys; the decode rows also equal
    the allocator's reference paged read."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, size = 4, 2, 8, 4
    kv = KVCacheManager(BlockPool(24, size, 1, kv_heads, dim, dtype=torch.float64))
    shuffle_free_list(kv.pool, seed=2)
    lens, queries = [9, 14, 7, 11], [1, 1, 7, 5]
    dense = [(torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64),
              torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64)) for n in lens]
    slots = []
    for s, n in enumerate(lens):  # each sequence's K/V in its blocks; the step's tokens are its last q
        kv.allocate(s, [100 * s + t for t in range(n)])
        kv.pool.write(0, kv.slot_mapping(s), *dense[s])
        slots.append(kv.slot_mapping(s, n - queries[s]))
    batch = PagedBatch.build(torch.cat(slots), kv.block_tables(range(4)), lens, queries, size)
    query = torch.randn(sum(queries), heads, dim, generator=gen, dtype=torch.float64)
    for window in (None, 3):
        out = paged_attention(query, kv.pool.key_cache[0], kv.pool.value_cache[0], batch, 0.3, window)
        start = 0
        for s, (n, q) in enumerate(zip(lens, queries)):
            keys, values = (t.transpose(0, 1).repeat_interleave(2, dim=0)[None] for t in dense[s])
            at = torch.arange(n)
            mask = at[None, :] <= at[n - q:, None]
            if window is not None:
                mask &= at[None, :] > at[n - q:, None] - window
            want = F.scaled_dot_product_attention(query[start:start + q].transpose(0, 1)[None], keys, values,
                                                  attn_mask=mask, scale=0.3)[0].transpose(0, 1)
            torch.testing.assert_close(out[start:start + q], want, rtol=1e-12, atol=1e-12)
            start += q
    reference = paged_attention_reference(query[[0, 1]][:, :, None], kv.pool.key_cache[0], kv.pool.value_cache[0],
                                          kv.block_tables([0, 1]), kv.seq_lens([0, 1]), scale=0.3)
    out = paged_attention(query, kv.pool.key_cache[0], kv.pool.value_cache[0], batch, 0.3)
    torch.testing.assert_close(out[[0, 1]], reference[:, :, 0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="1 <= query_len <= seq_len"):
        PagedBatch.build(torch.cat(slots), kv.block_tables(range(4)), lens, [1, 1, 7, 12], size)
    with pytest.raises(ValueError, match="the same sequences"):
        PagedBatch.build(torch.cat(slots), kv.block_tables(range(3)), lens, queries, size)


# -- the model left as it was ----------------------------------------------------------------------------
def registered():
    from transformers import AttentionInterface

    return set(AttentionInterface._global_mapping)


def test_the_model_is_left_exactly_as_it_was():
    model = causal_lm()
    ids = torch.tensor([prompts([9])[0]])
    with torch.no_grad():
        before = model(ids).logits
    names, implementation = registered(), model.config._attn_implementation
    engine = ContinuousBatcher(model, block_size=4, num_blocks=16)
    assert len(registered() - names) == 1
    rid = engine.add_request(ids[0], 4)
    engine.step()
    assert model.config._attn_implementation == implementation   # switched only inside step()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    list(engine.stream())
    engine.close()
    engine.close()                                               # idempotent
    assert registered() == names and model.config._attn_implementation == implementation
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()
    assert engine.outputs(rid) == [alone(model, ids[0].tolist(), 4)] and engine.is_finished(rid)


def test_a_failing_step_restores_the_model_and_stops_the_batcher():
    model = causal_lm()
    implementation = model.config._attn_implementation

    def fail(*_):
        raise KeyError("boom")

    with ContinuousBatcher(model, block_size=4, num_blocks=16) as engine:
        engine.add_request([5, 6, 7], 3)
        handle = model.model.layers[1].register_forward_pre_hook(fail)
        with pytest.raises(KeyError, match="boom"):
            engine.step()
        handle.remove()
        assert model.config._attn_implementation == implementation
        with pytest.raises(RuntimeError, match="failed part way"):
            engine.step()


def test_a_layer_that_bypasses_the_registry_is_an_error_not_a_wrong_answer():
    model = causal_lm()
    attention = model.model.layers[1].self_attn
    attention.forward = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None)
    with ContinuousBatcher(model, block_size=4, num_blocks=16) as engine:
        engine.add_request([5, 6, 7], 3)
        with pytest.raises(RuntimeError, match=r"layers that did: \[0\]"):
            engine.step()


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value, error", [
    ("block_size", 0, ValueError), ("block_size", -4, ValueError), ("block_size", 4.0, TypeError),
    ("num_blocks", 0, ValueError), ("max_batch_tokens", 0, ValueError), ("max_batch_tokens", True, TypeError)])
def test_bad_settings_are_refused_and_the_model_untouched(name, value, error):
    model = causal_lm()
    state, names = {k: v.clone() for k, v in model.state_dict().items()}, registered()
    with pytest.raises(error, match=f"ContinuousBatcher: {name} must be an int >= 1"):
        ContinuousBatcher(model, **{name: value})
    assert registered() == names and model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_models_whose_attention_cannot_be_registered_are_refused():
    import transformers

    names = registered()
    with pytest.raises(TypeError, match="transformers causal LM .* got Linear"):
        ContinuousBatcher(torch.nn.Linear(4, 4))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="BertModel is not a decoder-only LM"):
        ContinuousBatcher(bert)
    model = causal_lm()
    model.model.layers[1].self_attn = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"found \[0\]"):
        ContinuousBatcher(model)
    assert registered() == names


def test_bad_requests_are_refused_and_nothing_changes():
    model = causal_lm()
    with ContinuousBatcher(model, block_size=4, num_blocks=8) as engine:
        with pytest.raises(ValueError, match="needs 9 blocks of 4 tokens .* the whole pool has 8"):
            engine.add_request(list(range(3, 35)), 2)               # 32 + 1 tokens of K/V
        with pytest.raises(ValueError, match="needs 9 blocks"):
            engine.add_request(list(range(3, 30)), 7)               # fits now, but not once generated
        with pytest.raises(ValueError, match="at least one token id in 0..95; got 96"):
            engine.add_request([1, 96], 2)
        with pytest.raises(ValueError, match="an empty prompt"):
            engine.add_request([], 2)
        with pytest.raises(TypeError, match="no tokenizer"):
            engine.add_request("hello", 2)
        with pytest.raises(TypeError, match=r"\[2, 3\]"):
            engine.add_request(torch.ones(2, 3, dtype=torch.long), 2)
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            engine.add_request([1, 2], 0)
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            engine.add_request([1, 2], 3, n=0)
        with pytest.raises(ValueError, match="temperature"):
            engine.add_request([1, 2], 3, do_sample=True, temperature=0.0)
        with pytest.raises(ValueError, match="request_id"):
            engine.outputs(7)
        assert not engine.has_unfinished() and engine.stats()["used_blocks"] == 0
        assert engine.generate([list(range(3, 30))], max_new_tokens=6) == [alone(model, list(range(3, 30)), 6)]
    with pytest.raises(TypeError, match="pool must be a BlockPool"):
        PagedAttentionBinding(model, "pool")
    with pytest.raises(ValueError, match="the model's"):
        PagedAttentionBinding(model, BlockPool(4, 4, 2, 2, 8, dtype=torch.float32))


# -- the benchmark ----------------------------------------------------------------------------------------
def test_bench_batching_quick(tmp_path, smollm2_cache):
    """The benchmark's smoke run on the built-in model: every variant serves the 4 requests, the
    engine's tokens equal greedy generate's alone, with prefix hits and fewer forwards than tokens."""
    import os

    out = tmp_path / "batching.json"
    env = dict(os.environ, ACCEL_CACHE=str(smollm2_cache[0]))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_batching.py"), "--quick", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300, env=env)
    record = json.loads(out.read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"generate, one request at a time", "generate, one padded batch", "generate, batches of 2",
                         "transformers continuous batching", "accel ContinuousBatcher"}
    assert all(r["tokens/s"] > 0 and r["KV MiB"] > 0 for r in rows.values())
    ours = rows["accel ContinuousBatcher"]
    assert ours["equal to greedy"] == "4/4" and ours["prefix_hits"] > 0 and ours["max_batch"] > 1
    assert ours["forward_calls"] < ours["generated"]
    assert 0 < ours["kv_over_held"] < 2  # a shared prefix's blocks are held once for several sequences
    assert record["workload"]["padded/real tokens, one batch"] > 1
