"""Greedy speculative decoding: token for token the target's own greedy ``generate``, with a draft
model or prompt lookup, on small Llama/Qwen2/Mistral-style models built from configs (seeded,
float64, so that verifying several tokens at once cannot flip an argmax by rounding)."""
from __future__ import annotations

import math

import pytest
import torch

from accel.llm.speculative import Sampler, prompt_lookup_proposal, speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def causal_lm(kind="llama", seed=0, layers=2, eos=None):
    import transformers

    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval().double()


def prompt(length=12, seed=1):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new, eos=None):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_a_draft_is_the_targets_own_greedy(kind, k):
    target, draft = causal_lm(kind, seed=0), causal_lm(kind, seed=1, layers=1)
    ids = prompt()
    out = speculative_generate(target, ids, draft=draft, num_draft_tokens=k, max_new_tokens=20)
    assert torch.equal(out.sequences, greedy(target, ids, 20))
    assert out.stats["new_tokens"] == 20


def test_the_target_as_its_own_draft_accepts_everything():
    """Every draft accepted: ceil(n / (k + 1)) verification passes after the prompt's (the pass that
    reads the prompt gives the first token)."""
    target, ids, k, new = causal_lm(), prompt(), 4, 21
    out = speculative_generate(target, ids, draft=target, num_draft_tokens=k, max_new_tokens=new)
    assert torch.equal(out.sequences, greedy(target, ids, new))
    assert out.stats["acceptance_rate"] == 1.0
    assert out.stats["target_calls"] == 1 + math.ceil((new - 1) / (k + 1))
    assert out.stats["mean_accepted_length"] == (new - 1) / (out.stats["target_calls"] - 1)


def test_a_random_draft_accepts_almost_nothing_and_changes_nothing():
    target, draft, ids = causal_lm(seed=0), causal_lm(seed=7), prompt(seed=3)
    out = speculative_generate(target, ids, draft=draft, num_draft_tokens=4, max_new_tokens=24)
    assert torch.equal(out.sequences, greedy(target, ids, 24))
    assert out.stats["acceptance_rate"] < 0.3 and out.stats["target_calls"] > 12


def test_an_end_of_sequence_token_mid_draft_stops_where_generate_stops():
    target = causal_lm(seed=0)
    ids = prompt(seed=5)
    free = greedy(target, ids, 30)[0, ids.shape[1]:].tolist()
    eos = free[9]  # the token the target emits tenth: generate stops right after it
    expected = greedy(target, ids, 30, eos=eos)
    assert expected.shape[1] == ids.shape[1] + free.index(eos) + 1
    for proposer in ({"draft": target}, {"draft": causal_lm(seed=2)}, {"prompt_lookup": 2}):
        out = speculative_generate(target, ids, num_draft_tokens=4, max_new_tokens=30, eos_token_id=eos, **proposer)
        assert torch.equal(out.sequences, expected), proposer


@pytest.mark.parametrize("new", [1, 2, 6, 7])
def test_max_new_tokens_reached_mid_draft(new):
    target, ids = causal_lm(), prompt(seed=4)
    out = speculative_generate(target, ids, draft=target, num_draft_tokens=4, max_new_tokens=new)
    assert torch.equal(out.sequences, greedy(target, ids, new))


def test_prompt_lookup_is_greedy_and_accepts_on_repeated_text():
    """A prompt that repeats itself: the target (as its own draft's stand-in, a model that copies)
    continues the pattern, and lookup drafts exactly that."""
    target = causal_lm(seed=0)
    ids = prompt(seed=6)
    continued = greedy(target, ids, 16)
    ids = torch.cat([continued, continued[:, 4:]], dim=1)  # input-grounded: the text recurs
    out = speculative_generate(target, ids, prompt_lookup=3, num_draft_tokens=4, max_new_tokens=16)
    assert torch.equal(out.sequences, greedy(target, ids, 16))
    assert out.stats["drafted"] > 0


def test_prompt_lookup_proposal():
    assert prompt_lookup_proposal([5, 6, 7, 8, 9, 5, 6, 7], ngram=3, count=2) == [8, 9]
    assert prompt_lookup_proposal([1, 2, 3, 1, 2, 4, 1, 2], ngram=2, count=3) == [4, 1, 2]  # the latest match
    assert prompt_lookup_proposal([1, 2, 3, 4], ngram=3, count=2) == []
    assert prompt_lookup_proposal([9, 1, 2, 9], ngram=3, count=5) == [1, 2, 9]  # falls back to one token


def test_bad_input_is_refused_by_name():
    target, ids = causal_lm(), prompt()
    other = causal_lm()
    other.config.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, ids, draft=other)
    with pytest.raises(ValueError, match="num_draft_tokens must be an int >= 0"):
        speculative_generate(target, ids, draft=target, num_draft_tokens=-1)
    with pytest.raises(ValueError, match=r"draft_confidence must be a float in \[0, 1\)"):
        speculative_generate(target, ids, draft=target, draft_confidence=1.0)
    with pytest.raises(ValueError, match="give a proposer"):
        speculative_generate(target, ids)
    with pytest.raises(TypeError, match="draft must be a transformers causal LM"):
        speculative_generate(target, ids, draft=lambda x: x)


def test_no_drafting_runs_the_loop_one_target_pass_per_token():
    target, ids = causal_lm(), prompt(seed=13)
    out = speculative_generate(target, ids, prompt_lookup=3, num_draft_tokens=0, max_new_tokens=10)
    assert torch.equal(out.sequences, greedy(target, ids, 10))
    assert out.stats["target_calls"] == 10 and out.stats["drafted"] == 0


def test_few_rows_linears_hook_every_linear_layer_inside_and_none_after():
    """Inside, each ``nn.Linear`` of the model (7 in each of its 2 layers, and the output layer) runs
    ``few_rows_linear``: a few rows come out as ``weight @ x^T`` computes them. Afterwards, and
    after an error inside, the model is as it was."""
    from accel.hooks import hooked_methods
    from accel.llm.speculative import few_rows_linears

    target = causal_lm()
    linears = [m for m in target.modules() if type(m) is torch.nn.Linear]
    layer, x = linears[0], torch.randn(1, 3, 32, dtype=torch.float64)
    with few_rows_linears(target) as hooked:
        assert hooked == len(linears) == 2 * 7 + 1
        assert torch.equal(layer(x), torch.mm(layer.weight, x[0].t()).t()[None])
    with pytest.raises(RuntimeError, match="inside"):
        with few_rows_linears(target):
            raise RuntimeError("inside")
    with few_rows_linears(target, on=False) as hooked:
        assert hooked == 0
    assert all(not hooked_methods(m) and "forward" not in vars(m) for m in linears)


@pytest.mark.parametrize("few_rows", [True, False])
def test_either_way_of_computing_linears_gives_the_targets_greedy_tokens(few_rows):
    target, draft, ids = causal_lm(seed=0), causal_lm(seed=1, layers=1), prompt(seed=21)
    out = speculative_generate(target, ids, draft=draft, prompt_lookup=2, num_draft_tokens=3, max_new_tokens=16,
                               few_rows=few_rows)
    assert torch.equal(out.sequences, greedy(target, ids, 16))
    with pytest.raises(TypeError, match="few_rows must be a bool"):
        speculative_generate(target, ids, draft=draft, few_rows="yes")


def reference_adaptive(target, draft, ids, k, confidence, new, lookup=None):
    """Greedy speculative decoding with an adaptive draft, slowly: no caches, every forward over
    the whole sequence; the draft stops after a token whose probability is below ``confidence``.
    ``lookup``: prompt lookup first, on n-grams of ``lookup`` down to 2 tokens, the draft where
    none recurs. Returns (tokens, drafted, accepted)."""
    tokens, drafted, accepted = ids[0].tolist(), 0, 0
    with torch.no_grad():
        tokens.append(int(target(torch.tensor([tokens])).logits[0, -1].argmax()))
        while len(tokens) - ids.shape[1] < new:
            room = min(k, new - (len(tokens) - ids.shape[1]) - 1)
            proposal = []
            for n in range(min(lookup or 0, len(tokens) - 1), 1, -1):
                starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[-n:]]
                if starts and room > 0:
                    proposal = tokens[starts[-1] + n:starts[-1] + n + room]
                    break
            for _ in range(0 if proposal else room):
                probs = draft(torch.tensor([tokens + proposal])).logits[0, -1].softmax(-1)
                proposal.append(int(probs.argmax()))
                if float(probs.max()) < confidence:
                    break
            choices = target(torch.tensor([tokens + proposal])).logits[0, len(tokens) - 1:].argmax(-1).tolist()
            kept = 0
            while kept < len(proposal) and proposal[kept] == choices[kept]:
                kept += 1
            tokens += proposal[:kept] + [choices[kept]]
            drafted, accepted = drafted + len(proposal), accepted + kept
    return tokens, drafted, accepted


@pytest.mark.parametrize("confidence", [0.0, 0.05, 0.2])
def test_an_adaptive_draft_stops_where_it_is_unsure_as_the_slow_reference_does(confidence):
    """The draft stops drafting after a token it gave a probability below ``draft_confidence``: the
    same tokens, drafted and accepted counts as a slow reference, at batch size 1 and, row by row,
    in a left-padded batch (each row's counts are its own, whatever the other rows do)."""
    target = causal_lm(seed=0)
    draft = noisy_copy(target, 0.02)
    ids, mask = left_padded([11, 7, 9], seed=6)
    rows = [ids[b:b + 1, ids.shape[1] - int(mask[b].sum()):] for b in range(3)]
    expected = [reference_adaptive(target, draft, row, 4, confidence, 14) for row in rows]
    for row, (tokens, drafted, accepted) in zip(rows, expected):
        out = speculative_generate(target, row, draft=draft, num_draft_tokens=4, max_new_tokens=14,
                                   draft_confidence=confidence)
        assert out.sequences[0].tolist() == tokens
        assert (out.stats["drafted"], out.stats["accepted"]) == (drafted, accepted)
    out = speculative_generate(target, ids, attention_mask=mask, draft=draft, num_draft_tokens=4, max_new_tokens=14,
                               draft_confidence=confidence, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, 14))
    assert out.stats["drafted"] == sum(e[1] for e in expected)
    assert out.stats["accepted_per_row"] == [e[2] for e in expected]
    if confidence == 0.2:
        assert sum(e[1] for e in expected) < 3 * 4 * 4  # it did stop early somewhere


# -- accel.patch(model, speculative=...): the model's own generate -------------------------------------


def test_patched_generate_is_speculative_greedy_and_unpatch_restores_it():
    import accel

    target, draft, ids = causal_lm(seed=0), causal_lm(seed=0, layers=1), prompt(seed=8)
    expected = greedy(target, ids, 18)
    original = type(target).generate
    accel.patch(target, speculative=draft)
    assert "generate" in accel.describe(target)["methods"]["speculative"]["patched"]["modules"]
    out = target.generate(ids, max_new_tokens=18, do_sample=False)
    assert torch.equal(out, expected)
    stats = accel.describe(target)["methods"]["speculative"]["last_call"]
    assert stats["new_tokens"] == 18 and stats["drafted"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    accel.unpatch(target)
    assert "generate" not in vars(target) and type(target).generate is original
    assert torch.equal(greedy(target, ids, 18), expected)


def test_draft_and_prompt_lookup_together_match_the_slow_reference():
    """Both proposers: prompt lookup where a 2-gram or longer recurs, the draft elsewhere. The same
    tokens, drafted and accepted counts as the slow reference at batch size 1, and row by row in a
    left-padded batch (the small model's greedy text falls into loops, so prompt lookup serves some
    rounds of some rows and the draft the others)."""
    target = causal_lm(seed=0)
    draft = noisy_copy(target, 0.02)
    ids, mask = left_padded([16, 9, 12], seed=3, repeat_row=0)
    rows = [ids[b:b + 1, ids.shape[1] - int(mask[b].sum()):] for b in range(3)]
    expected = [reference_adaptive(target, draft, row, 4, 0.0, 16, lookup=3) for row in rows]
    for row, (tokens, drafted, accepted) in zip(rows, expected):
        out = speculative_generate(target, row, draft=draft, prompt_lookup=3, num_draft_tokens=4, max_new_tokens=16)
        assert out.sequences[0].tolist() == tokens
        assert (out.stats["drafted"], out.stats["accepted"]) == (drafted, accepted)
    out = speculative_generate(target, ids, attention_mask=mask, draft=draft, prompt_lookup=3, num_draft_tokens=4,
                               max_new_tokens=16, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, 16))
    assert out.stats["drafted"] == sum(e[1] for e in expected)
    assert out.stats["accepted_per_row"] == [e[2] for e in expected]
    draft_only = [reference_adaptive(target, draft, row, 4, 0.0, 16)[1:] for row in rows]
    assert sum(a != e[1:] for a, e in zip(draft_only, expected)) >= 2  # prompt lookup served some rounds


def test_patched_generate_passes_the_draft_confidence():
    import accel

    target, ids = causal_lm(seed=0), prompt(seed=8)
    draft = noisy_copy(target, 0.02)
    expected = reference_adaptive(target, draft, ids, 4, 0.2, 16)
    with accel.patched(target, speculative={"draft": draft, "draft_confidence": 0.2}):
        out = target.generate(ids, max_new_tokens=16, do_sample=False)
        stats = accel.describe(target)["methods"]["speculative"]["last_call"]
    assert out[0].tolist() == expected[0] and (stats["drafted"], stats["accepted"]) == expected[1:]
    with pytest.raises(ValueError, match=r"draft_confidence must be a float in \[0, 1\)"):
        accel.patch(target, speculative={"draft": draft, "draft_confidence": -0.1})
    assert not accel.describe(target)["methods"]


@pytest.mark.parametrize("few_rows", [True, False])
def test_patched_generate_passes_few_rows(few_rows):
    """The setting reaches the loop: the model's linear layers are hooked during its passes or not."""
    import accel
    from accel.hooks import hooked_methods

    target, ids = causal_lm(seed=0), prompt(seed=8)
    expected, seen = greedy(target, ids, 6), []
    target.lm_head.register_forward_pre_hook(lambda module, args: seen.append(bool(hooked_methods(module))))
    with accel.patched(target, speculative={"prompt_lookup": 2, "few_rows": few_rows}):
        out = target.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    assert seen and set(seen) == {few_rows} and not hooked_methods(target.lm_head)
    with pytest.raises(TypeError, match="few_rows must be a bool; got int"):
        accel.patch(target, speculative={"prompt_lookup": 2, "few_rows": 1})
    assert not accel.describe(target)["methods"]


def test_prompt_lookup_shorthand():
    import accel

    target, ids = causal_lm(seed=0), prompt(seed=9)
    expected = greedy(target, ids, 10)
    with accel.patched(target, speculative="prompt_lookup"):
        assert accel.describe(target)["methods"]["speculative"]["settings"]["prompt_lookup"] == 3
        assert torch.equal(target.generate(ids, max_new_tokens=10), expected)


@pytest.mark.parametrize("option, value, message", [
    ("num_beams", 2, "num_beams=2 is not served yet"),
    ("min_p", 0.1, "min_p=0.1 is not served yet"),
    ("repetition_penalty", 1.3, "repetition_penalty=1.3 is not served yet"),
    ("streamer", object(), "streamer are not served"),
    ("stop_strings", ["x"], r"stop_strings=\[.x.\] is not served yet"),
])
def test_options_it_does_not_serve_are_refused_by_name(option, value, message):
    import accel

    target, ids = causal_lm(), prompt()
    with accel.patched(target, speculative="prompt_lookup"):
        with pytest.raises(ValueError, match=message):
            target.generate(ids, max_new_tokens=4, **{option: value})


def test_a_bad_draft_is_refused_and_the_model_left_as_it_was():
    import accel

    target = causal_lm()
    other = causal_lm()
    other.config.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match="vocabulary"):
        accel.patch(target, speculative=other)
    with pytest.raises(TypeError, match="speculative: expected"):
        accel.patch(target, speculative=lambda x: x)
    with pytest.raises(ValueError, match="num_draft_tokens must be an int >= 1"):
        accel.patch(target, speculative={"prompt_lookup": 2, "num_draft_tokens": 0})
    assert not accel.describe(target)["methods"] and "generate" not in vars(target)


# -- speculative sampling: the target's distribution --------------------------------------------------


def chi_square(counts, probs):
    """Pearson's statistic of observed ``counts`` against ``probs`` (cells of zero probability must
    be empty)."""
    counts, probs = torch.as_tensor(counts, dtype=torch.float64), torch.as_tensor(probs, dtype=torch.float64)
    assert counts[probs == 0].sum() == 0
    expected = probs * counts.sum()
    keep = probs > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


# Pearson's chi-square at p = 0.001 for the degrees of freedom used below (a test that fails by
# chance once in a thousand runs; the seeds are fixed, so it does not flake)
CHI2_999 = {4: 18.47, 24: 51.18}


@pytest.mark.parametrize("with_draft", [True, False])
def test_the_verification_step_emits_the_target_distribution(with_draft):
    """One position: draft token d ~ q, then verification; the token emitted first must be
    distributed as p, whatever q (or a certain proposal, as prompt lookup's)."""
    from accel.llm.speculative import Sampler, verify_sampled

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1], dtype=torch.float64)
    sampler, counts = Sampler(generator=g), torch.zeros(5)
    target_probs = torch.stack([p, torch.full((5,), 0.2, dtype=torch.float64)])
    for _ in range(8000):
        d = int(torch.multinomial(q, 1, generator=g)) if with_draft else 0
        kept, following = verify_sampled([d], q[None] if with_draft else None, target_probs, sampler)
        counts[d if kept else following] += 1
    statistic, dof = chi_square(counts, p)
    assert statistic < CHI2_999[dof], (statistic, counts.tolist())


def test_the_sampler_warps_as_transformers_does():
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from accel.llm.speculative import Sampler

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for temperature, top_k, top_p in ((1.0, None, None), (0.7, 10, None), (1.3, None, 0.8), (0.9, 5, 0.6)):
        warpers = [TemperatureLogitsWarper(temperature)]
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p else []
        expected = LogitsProcessorList(warpers)(None, logits.clone()).softmax(-1)
        ours = Sampler(temperature, top_k, top_p).probs(logits)
        assert torch.equal(ours > 0, expected > 0)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def tiny_lm(seed):
    """A 6-token Llama (float64) for the distribution tests."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval().double()


def two_token_probabilities(target, row, sampler):
    """The exact joint probability ``[36]`` of the first two tokens the target samples after ``row``."""
    context = torch.tensor([row])
    with torch.no_grad():
        first = sampler.probs(target(context).logits[0, -1:])[0]
        return torch.stack([first[a] * sampler.probs(target(torch.cat([context, torch.tensor([[a]])], 1))
                                                     .logits[0, -1:])[0] for a in range(6)]).flatten()


def check_two_sampled_tokens(drafter_for, padded, draws):
    """The first two new tokens, sampled ``draws`` times with the proposer ``drafter_for(target)``
    (random, so drafts are rejected and resampled), against their exact joint probability under
    the target with the same temperature and top-k: one prompt, or (``padded``) two rows of
    different lengths, left-padded."""
    target = tiny_lm(0)
    draft = drafter_for(target)
    rows = [[1, 4, 2], [3, 5]] if padded else [[1, 4, 2]]
    ids, mask = (torch.tensor([[1, 4, 2], [0, 3, 5]]), torch.tensor([[1, 1, 1], [0, 1, 1]])) if padded else \
        (torch.tensor(rows), None)
    sampler = Sampler(temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3 if padded else 2))
    exact = [two_token_probabilities(target, row, sampler) for row in rows]
    counts = torch.zeros(len(rows), 36)
    for _ in range(draws):
        out = speculative_generate(target, ids, attention_mask=mask, draft=draft, num_draft_tokens=2,
                                   max_new_tokens=2, sampler=sampler, pad_token_id=0)
        for b in range(len(rows)):
            a, c = out.sequences[b, 3:].tolist()
            counts[b, 6 * a + c] += 1
    for b in range(len(rows)):
        statistic, dof = chi_square(counts[b], exact[b])
        assert statistic < CHI2_999[dof], (b, statistic, dof)


def test_speculative_sampling_draws_two_tokens_as_the_target_does():
    check_two_sampled_tokens(lambda target: tiny_lm(1), padded=False, draws=2000)


def test_speculative_sampling_in_a_padded_batch_draws_each_row_as_the_target_does():
    check_two_sampled_tokens(lambda target: tiny_lm(1), padded=True, draws=1500)


def test_patched_generate_samples_a_batch():
    """do_sample=True on a left-padded batch: reproducible with torch's global seed, every token
    among the target's top-k at its position in its row."""
    import accel

    target = causal_lm(seed=0)
    ids, mask = left_padded([9, 6], seed=8)
    with accel.patched(target, speculative=noisy_copy(target, 0.01)):
        torch.manual_seed(7)
        first = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=3, pad_token_id=0)
        torch.manual_seed(7)
        again = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=3, pad_token_id=0)
    assert torch.equal(first, again) and first.shape == (2, ids.shape[1] + 10)
    for b in range(2):
        row = first[b:b + 1, ids.shape[1] - int(mask[b].sum()):]
        with torch.no_grad():
            top3 = target(row[:, :-1]).logits[0, int(mask[b].sum()) - 1:].topk(3, dim=-1).indices
        assert all(int(t) in top3[i].tolist() for i, t in enumerate(row[0, int(mask[b].sum()):]))


def test_bad_sampling_settings_are_refused_by_name():
    from accel.llm.speculative import Sampler

    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        Sampler(temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be a float in"):
        Sampler(top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        Sampler(top_k=0)


def test_patched_generate_samples_with_generates_settings():
    """do_sample=True: a Sampler with generate's temperature, top-k and top-p; reproducible with
    torch's global seed, and never a token outside the top-k."""
    import accel

    target, ids = causal_lm(seed=0), prompt(seed=10)
    with accel.patched(target, speculative=causal_lm(seed=3, layers=1)):
        torch.manual_seed(5)
        first = target.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=3)
        torch.manual_seed(5)
        again = target.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=3)
    assert torch.equal(first, again) and first.shape == (1, ids.shape[1] + 12)
    with torch.no_grad():  # every sampled token is among the target's 3 most likely at its position
        logits = target(first[:, :-1]).logits[0, ids.shape[1] - 1:]
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(token) in top3[i].tolist() for i, token in enumerate(first[0, ids.shape[1]:]))


# -- batch size above 1: each row accepts its own number of tokens ------------------------------------


def left_padded(lengths, seed=1, repeat_row=None):
    """Prompts of different lengths, left-padded with 0 (``repeat_row``: that row's prompt is one
    short pattern repeated, so prompt lookup finds matches there and nowhere else)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(3, VOCAB, (n,), generator=g)
        if b == repeat_row:
            row = row[:4].repeat(n // 4 + 1)[:n]
        ids[b, width - n:], mask[b, width - n:] = row, 1
    return ids, mask


def noisy_copy(model, scale, seed=11):
    """The model with its weights perturbed: a draft that agrees with it often but not always."""
    import copy

    g = torch.Generator().manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return draft


def greedy_batch(model, ids, mask, new, eos=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=eos,
                              pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [2, 4])
def test_a_left_padded_batch_is_the_targets_own_batched_greedy(kind, k):
    target = causal_lm(kind, seed=0)
    ids, mask = left_padded([12, 5, 9])
    draft = noisy_copy(target, 0.005)
    out = speculative_generate(target, ids, attention_mask=mask, draft=draft, num_draft_tokens=k, max_new_tokens=16,
                               pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, 16))
    rows = out.stats["accepted_per_row"]
    assert len(set(rows)) > 1 and 0 < out.stats["acceptance_rate"] < 1  # rows accepted different counts


def test_a_batch_with_the_target_as_its_own_draft_accepts_everything():
    target = causal_lm(seed=0)
    ids, mask = left_padded([10, 6, 8, 3], seed=2)
    k, new = 3, 15
    out = speculative_generate(target, ids, attention_mask=mask, draft=target, num_draft_tokens=k, max_new_tokens=new,
                               pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, new))
    assert out.stats["acceptance_rate"] == 1.0
    assert out.stats["target_calls"] == 1 + math.ceil((new - 1) / (k + 1))


def test_prompt_lookup_in_a_batch_accepts_only_where_text_recurs():
    target = causal_lm(seed=0)
    ids, mask = left_padded([16, 11, 13], seed=3, repeat_row=0)
    out = speculative_generate(target, ids, attention_mask=mask, prompt_lookup=2, num_draft_tokens=4,
                               max_new_tokens=12, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_batch(target, ids, mask, 12))
    assert out.stats["drafted"] > 0


def test_a_row_ending_mid_batch_is_padded_as_generate_pads_it():
    target = causal_lm(seed=0)
    ids, mask = left_padded([9, 12, 6], seed=4)
    free = greedy_batch(target, ids, mask, 20)[1, ids.shape[1]:].tolist()
    eos = free[4]  # row 1 stops after its fifth token; the others may stop elsewhere or not at all
    expected = greedy_batch(target, ids, mask, 20, eos=eos)
    for proposer in ({"draft": noisy_copy(target, 0.005)}, {"draft": target}, {"prompt_lookup": 2}):
        out = speculative_generate(target, ids, attention_mask=mask, num_draft_tokens=3, max_new_tokens=20,
                                   eos_token_id=eos, pad_token_id=0, **proposer)
        assert torch.equal(out.sequences, expected), proposer


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_a_row_that_ends_leaves_the_batch_and_the_others_decode_on(kind):
    """After a row's end-of-sequence token the target runs on the other rows only (its cache and the
    draft's drop the row), and every row is still generate's."""
    target = causal_lm(kind, seed=0)
    ids, mask = left_padded([9, 12, 6], seed=4)
    eos = greedy_batch(target, ids, mask, 20)[1, ids.shape[1]:].tolist()[4]  # row 1 stops after five tokens
    expected = greedy_batch(target, ids, mask, 20, eos=eos)
    for proposer in ({"draft": noisy_copy(target, 0.005)}, {"prompt_lookup": 2}, {"prompt_lookup": 2, "k": 0}):
        rows = []
        handle = target.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                                  with_kwargs=True)
        try:
            out = speculative_generate(target, ids, attention_mask=mask, num_draft_tokens=proposer.pop("k", 3),
                                       max_new_tokens=20, eos_token_id=eos, pad_token_id=0, **proposer)
        finally:
            handle.remove()
        assert torch.equal(out.sequences, expected), proposer
        assert rows[0] == 3 and 1 <= rows[-1] < 3 and rows == sorted(rows, reverse=True), rows


def test_patched_generate_serves_a_padded_batch():
    import accel

    target = causal_lm(seed=0)
    ids, mask = left_padded([7, 11], seed=5)
    expected = greedy_batch(target, ids, mask, 10)
    with accel.patched(target, speculative=noisy_copy(target, 0.005)):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(out, expected)


# -- self-speculation: the model's own first layers as the draft ---------------------------------------


def test_a_layer_skip_draft_is_the_models_first_layers_and_leaves_the_model_alone():
    from accel.llm.speculative import layer_skip_draft

    target, ids = causal_lm(seed=0, layers=3), prompt(seed=12)
    with torch.no_grad():
        before = target(ids).logits
        draft = layer_skip_draft(target, 1)
        h = target.model.embed_tokens(ids)
        position = torch.arange(ids.shape[1])[None]
        rotary = target.model.rotary_emb(h, position)
        h = target.model.layers[0](h, attention_mask=None, position_ids=position, position_embeddings=rotary)
        h = h[0] if isinstance(h, tuple) else h
        by_hand = target.lm_head(target.model.norm(h))
        torch.testing.assert_close(draft(ids).logits, by_hand, rtol=0, atol=1e-10)
        assert torch.equal(target(ids).logits, before) and target.config.num_hidden_layers == 3
        assert draft.lm_head.weight is target.lm_head.weight  # shared, not copied
    out = speculative_generate(target, ids, draft=draft, num_draft_tokens=3, max_new_tokens=12)
    assert torch.equal(out.sequences, greedy(target, ids, 12))
    with pytest.raises(ValueError, match=r"layers must be an int in \[1, 2\]"):
        layer_skip_draft(target, 3)
