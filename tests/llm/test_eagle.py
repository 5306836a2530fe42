"""Speculative decoding with an EAGLE head (a drafter reading the target's features): greedy output
is the target's own, the head's cached, rolled-back drafting proposes what a slow cache-free
reference proposes, sampling keeps the target's distribution, and bad heads are refused."""
from __future__ import annotations

import copy

import pytest
import torch

import accel
from accel.llm.eagle import EagleBatchProposer, EagleHead, EagleProposer, load_eagle_head, save_eagle_head
from accel.llm.speculative import speculative_generate

from tests.llm.test_speculative import (causal_lm, check_two_sampled_tokens, greedy, greedy_batch, left_padded,
                                       prompt)

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


def test_a_float32_head_drafts_for_a_float64_target():
    target = causal_lm(seed=0)
    ids = prompt()
    out = speculative_generate(target, ids, draft=head_for(target).float(), num_draft_tokens=3, max_new_tokens=12)
    assert torch.equal(out.sequences, greedy(target, ids, 12)) and out.stats["drafted"] > 0


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


@pytest.mark.parametrize("padded", [False, True])
def test_speculative_sampling_with_an_eagle_head_draws_as_the_target_does(padded):
    """The first two tokens of a 6-token model with a random head, one prompt and a padded batch."""
    check_two_sampled_tokens(lambda target: head_for(target, seed=1), padded=padded, draws=1500)


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


def test_a_masked_parallel_pass_equals_drafting_one_step_after_each_true_prefix():
    """The training of the second drafting step (scripts/train_smollm2_eagle.py --unroll 2): position
    i reads the head's own predicted feature, attending to the true pairs before i and to itself;
    in one pass that equals, for every i, the head run on the true prefix and then one draft step."""
    torch.manual_seed(0)
    head = EagleHead(32, 4, 2, 64, range(50), 60).double()
    length = 8
    features, embeds = torch.randn(2, 1, length, 32, dtype=torch.float64)
    positions = torch.arange(length)[None]
    predicted, past = head(features, embeds, positions)
    before = torch.ones(length, length, dtype=torch.bool).tril(-1)
    attend = torch.cat([before, torch.eye(length, dtype=torch.bool)], dim=1)[None]
    own = torch.cat([features[:, :1], predicted[:, :-1]], dim=1)
    second, _ = head(own, embeds, positions, past, attend=attend)
    for i in range(1, length):
        _, prefix = head(features[:, :i], embeds[:, :i], positions[:, :i])
        step, _ = head(predicted[:, i - 1:i], embeds[:, i:i + 1], positions[:, i:i + 1], prefix)
        torch.testing.assert_close(step[0, 0], second[0, i], rtol=0, atol=1e-12)


# -- batches --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_a_left_padded_batch_with_an_eagle_head_is_the_targets_own_batched_greedy(kind):
    target = causal_lm(kind, seed=0)
    ids, mask = left_padded([12, 5, 9])
    out = speculative_generate(target, ids, attention_mask=mask, draft=head_for(target), num_draft_tokens=3,
                               max_new_tokens=16, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, 16))
    assert out.stats["drafted"] > 0 and not final_norm_hooks(target)


def recorder(monkeypatch, proposer_class, rows_of):
    """Each row's proposals, in order, as ``proposer_class.propose`` makes them, keyed by the row's
    place in the batch it started in (a row that finishes leaves the batch: ``keep_rows``)."""
    made, origin = {}, []
    propose = proposer_class.propose

    def recording(self, room, sampler=None, confidence=0.0):
        proposals, probs = propose(self, room, sampler, confidence)
        if not origin and isinstance(room, (list, tuple)):
            origin.extend(range(len(room)))
        for b, proposal in rows_of(room, proposals):
            made.setdefault(origin[b] if origin else b, []).append(proposal)
        return proposals, probs

    monkeypatch.setattr(proposer_class, "propose", recording)
    keep_rows = getattr(proposer_class, "keep_rows", None)
    if keep_rows is not None:
        def keeping(self, rows):
            origin[:] = [origin[i] for i in rows.tolist()]
            keep_rows(self, rows)
        monkeypatch.setattr(proposer_class, "keep_rows", keeping)
    return made


def test_each_rows_proposals_in_a_batch_are_what_it_proposes_alone(monkeypatch):
    """Rows of different lengths keep different numbers of tokens each round; the head's masked
    batch cache must give every row, every round, the proposal it makes decoded alone (with
    prompt lookup serving the row whose prompt repeats)."""
    target = causal_lm(seed=0)
    head = head_for(target, seed=5)
    ids, mask = left_padded([12, 5, 9, 16], repeat_row=3)
    batched = recorder(monkeypatch, EagleBatchProposer,
                       lambda room, proposals: [(b, p) for b, p in enumerate(proposals) if room[b] > 0])
    out = speculative_generate(target, ids, attention_mask=mask, draft=head, prompt_lookup=3, num_draft_tokens=3,
                               max_new_tokens=20, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, 20))
    alone = recorder(monkeypatch, EagleProposer, lambda count, proposal: [(0, proposal)])
    for b in range(4):
        alone.clear()
        row = ids[b:b + 1, mask[b].bool()]
        speculative_generate(target, row, draft=head, prompt_lookup=3, num_draft_tokens=3, max_new_tokens=20)
        assert batched.get(b, []) == alone.get(0, []), b
    assert len(set(out.stats["accepted_per_row"])) > 1 and out.stats["accepted"] > 0

