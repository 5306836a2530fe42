"""Speculative decoding with an EAGLE head (a drafter reading the target's features): greedy output
is the target's own, the head's cached, rolled-back drafting proposes what a slow cache-free
reference proposes, sampling keeps the target's distribution, and bad heads are refused."""
from __future__ import annotations

import copy

import pytest
import torch

import accel
from accel.llm.eagle import EagleHead, EagleProposer, load_eagle_head, save_eagle_head
from accel.llm.speculative import Sampler, speculative_generate

from tests.llm.test_speculative import CHI2_999, causal_lm, chi_square, greedy, prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def head_for(target, seed=0, kept=None):
    torch.manual_seed(seed)
    head = EagleHead.for_target(target, kept).double().eval()
    with torch.no_grad():  # a random head, not the pass-through start: its guesses vary
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return head


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_an_eagle_head_is_the_targets_own_greedy(kind, k):
    target = causal_lm(kind, seed=0)
    ids = prompt()
    out = speculative_generate(target, ids, draft=head_for(target), num_draft_tokens=k, max_new_tokens=20)
    assert torch.equal(out.sequences, greedy(target, ids, 20))
    assert out.stats["new_tokens"] == 20 and out.stats["drafted"] > 0
    assert not final_norm_hooks(target)  # the feature hook is gone afterwards


def final_norm_hooks(target):
    return dict(target.model.norm._forward_hooks)


@torch.no_grad()
def reference_guesses(head, target, sequence, true, count, kept):
    """Without any cache: the head reads the pairs (f_i, x_{i+1}) for i < ``true`` from the target's
    features of ``sequence``, then chains ``count`` greedy guesses on its own outputs."""
    features = target.model(input_ids=torch.tensor([sequence[:true + 1]])).last_hidden_state[:, :true]
    tokens = list(sequence[1:true + 1])
    weight = target.get_output_embeddings().weight[kept]
    guesses = []
    for _ in range(count):
        out, _ = head(features, target.get_input_embeddings()(torch.tensor([tokens])),
                      torch.arange(len(tokens))[None])
        guesses.append(int(kept[int((out[0, -1] @ weight.T).argmax())]))
        features = torch.cat([features, out[:, -1:]], dim=1)
        tokens.append(guesses[-1])
    return guesses


def test_the_heads_cached_drafting_proposes_what_a_cache_free_reference_does(monkeypatch):
    """Every round's proposal, made on the head's rolled-back KV cache, equals the reference's from
    the true prefix; a head over a subset of ids proposes only those."""
    target = causal_lm(seed=0)
    kept = torch.arange(3, 80)
    head = head_for(target, seed=3, kept=kept.tolist())
    rounds = []
    propose = EagleProposer.propose

    def recording(self, count, sampler=None, confidence=0.0):
        proposal, probs = propose(self, count, sampler, confidence)
        rounds.append((self.true, count, proposal))
        return proposal, probs

    monkeypatch.setattr(EagleProposer, "propose", recording)
    ids = prompt(length=9, seed=4)
    out = speculative_generate(target, ids, draft=head, num_draft_tokens=3, max_new_tokens=30)
    assert torch.equal(out.sequences, greedy(target, ids, 30))
    sequence = out.sequences[0].tolist()
    assert len(rounds) >= 8 and any(len(p) for _, _, p in rounds)
    for true, count, proposal in rounds:
        assert proposal == reference_guesses(head, target, sequence, true, count, kept)
        assert all(int(t) in set(kept.tolist()) for t in proposal)
    assert out.stats["accepted"] == sum(
        next(i for i in range(len(p) + 1) if i == len(p) or p[i] != sequence[true + 1 + i]) for true, _, p in rounds)


def test_eagle_with_prompt_lookup_is_greedy():
    target = causal_lm(seed=0)
    ids = torch.cat([prompt(length=8, seed=5)] * 3, dim=1)
    out = speculative_generate(target, ids, draft=head_for(target), prompt_lookup=3, num_draft_tokens=4,
                               max_new_tokens=24)
    assert torch.equal(out.sequences, greedy(target, ids, 24))


def test_an_eagle_head_stops_where_generate_stops():
    target = causal_lm(seed=0)
    ids = prompt()
    eos = greedy(target, ids, 12)[0, ids.shape[1] + 6].item()
    target.generation_config.eos_token_id = eos
    out = speculative_generate(target, ids, draft=head_for(target), num_draft_tokens=4, max_new_tokens=12)
    assert torch.equal(out.sequences, greedy(target, ids, 12, eos=eos))


def test_speculative_sampling_with_an_eagle_head_draws_as_the_target_does():
    """The first two new tokens of a 6-token model sampled 2,000 times with a random head, against
    their exact joint probability under the target."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=None)
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(config).eval().double()
    head = head_for(target, seed=1)
    ids = torch.tensor([[1, 4, 2]])
    sampler = Sampler(temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = sampler.probs(target(ids).logits[0, -1:])[0]
        exact = torch.stack([first[a] * sampler.probs(target(torch.cat([ids, torch.tensor([[a]])], 1)).logits[0, -1:])[0]
                             for a in range(6)]).flatten()
    counts = torch.zeros(36)
    for _ in range(2000):
        out = speculative_generate(target, ids, draft=head, num_draft_tokens=2, max_new_tokens=2, sampler=sampler)
        a, b = out.sequences[0, 3:].tolist()
        counts[6 * a + b] += 1
    statistic, dof = chi_square(counts, exact)
    assert statistic < CHI2_999[dof], (statistic, dof)


def test_patched_generate_drafts_with_an_eagle_head_and_unpatch_restores_it():
    target = causal_lm(seed=0)
    ids = prompt()
    expected = greedy(target, ids, 16)
    original = type(target).generate
    accel.patch(target, speculative={"draft": head_for(target), "num_draft_tokens": 3})
    assert "EAGLE head" in accel.describe(target)["methods"]["speculative"]["patched"]["modules"]["generate"]
    assert torch.equal(target.generate(ids, max_new_tokens=16, do_sample=False), expected)
    stats = accel.describe(target)["methods"]["speculative"]["last_call"]
    assert stats["new_tokens"] == 16 and stats["drafted"] > 0
    accel.unpatch(target)
    assert "generate" not in vars(target) and type(target).generate is original and not final_norm_hooks(target)


def test_a_head_that_does_not_fit_is_refused_and_the_model_left_as_it_was():
    target = causal_lm(seed=0)
    torch.manual_seed(0)
    wrong = EagleHead(48, 4, 2, 64, range(96), 96).double()
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="EAGLE head was made for width 48"):
        speculative_generate(target, prompt(), draft=wrong)
    with pytest.raises(ValueError, match="EAGLE head was made for width 48"):
        accel.patch(target, speculative=wrong)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(target, torch.cat([prompt()] * 2), draft=head_for(target))
    with pytest.raises(ValueError, match="kept_ids"):
        EagleHead(32, 4, 2, 64, [1, 1], 96)
    assert not accel.describe(target)["methods"] and "generate" not in vars(target) and not final_norm_hooks(target)
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())


def test_a_saved_head_loads_back_in_float16_precision(tmp_path):
    target = causal_lm(seed=0)
    head = head_for(target, kept=list(range(5, 90))).float()
    save_eagle_head(head, tmp_path, {"note": "test"})
    loaded = load_eagle_head(tmp_path)
    assert loaded.kept_ids.tolist() == list(range(5, 90)) and loaded.settings == head.settings
    x, e = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    positions = torch.arange(5)[None]
    expected, _ = copy.deepcopy(head).half().float()(x, e, positions)
    torch.testing.assert_close(loaded(x, e, positions)[0], expected)
