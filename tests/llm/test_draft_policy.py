"""The goodput draft-length policy (``accel.llm.draft_policy``): its choice against expected tokens
per second computed by hand, and in speculative decoding: the target's own greedy tokens whatever
it chooses, no drafting where every draft is rejected, full drafts where prompt lookup is right."""
from __future__ import annotations

import pytest
import torch

import accel
from accel.llm.draft_policy import GoodputPolicy, expected_tokens
from accel.llm.speculative import speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")


def policy_with(costs, drafted, accepted, most=3):
    """A policy that has timed each ``k`` in ``costs`` once and seen ``accepted`` of ``drafted``."""
    policy = GoodputPolicy(most)
    for k, seconds in costs.items():
        policy.record(k, seconds, 0, 0)
    policy.drafted, policy.accepted = drafted, accepted
    return policy


def test_the_two_ends_are_measured_first():
    policy = GoodputPolicy(4)
    assert policy.choose() == 4
    policy.record(4, 1.0, 4, 2)
    assert policy.choose() == 0
    policy.record(0, 0.5, 0, 0)
    assert policy.choose() in range(5)


@pytest.mark.parametrize("alpha,slope,want", [(0.9, 0.1, 3), (0.1, 0.5, 0), (0.5, 0.15, 2), (0.5, 0.35, 1)])
def test_it_chooses_the_most_expected_tokens_per_second(alpha, slope, want):
    """Costs measured at 0 and 3, linear in between; expected tokens sum alpha^i, written out."""
    policy = policy_with({0: 1.0, 3: 1.0 + 3 * slope}, drafted=998, accepted=round(alpha * 1000) - 1)
    assert policy.acceptance() == pytest.approx(alpha)
    assert policy.cost(1) == pytest.approx(1.0 + slope) and policy.cost(2) == pytest.approx(1.0 + 2 * slope)
    rates = [sum(alpha ** i for i in range(k + 1)) / (1.0 + k * slope) for k in range(4)]
    assert rates.index(max(rates)) == want
    assert policy.choose() == want


def test_costs_beyond_the_measured_lengths_follow_the_nearest_slope():
    policy = policy_with({0: 1.0, 1: 1.5, 2: 1.7}, 0, 0, most=4)
    assert policy.cost(4) == pytest.approx(2.1)  # the slope between 1 and 2
    assert policy.cost(3) == pytest.approx(1.9)
    assert expected_tokens(0.5, 3) == 1 + 0.5 + 0.25 + 0.125


def test_in_a_batch_the_cost_follows_the_positions_checked():
    """Timed at 8 rows with 0 and 3 drafted (8 and 32 positions): 4 rows drafting 1 check 8
    positions too, and fewer rows (finished rows leave) make longer drafts pay."""
    policy = GoodputPolicy(3)
    policy.record(3, 2.0, 0, 0, rows=8)
    policy.record(0, 1.0, 0, 0, rows=8)
    policy.drafted, policy.accepted = 998, 499  # acceptance 1/2
    assert policy.cost(1, rows=4) == policy.cost(0, rows=8) == 1.0
    assert policy.cost(0, rows=2) == pytest.approx(1.0 - 6 / 24)  # below the measured: the nearest slope
    for rows, want in ((8, 1), (2, 2)):
        rates = [expected_tokens(0.5, k) / (1.0 + (rows * (1 + k) - 8) / 24) for k in range(4)]
        assert rates.index(max(rates)) == want
        assert policy.choose(rows) == want


def test_a_policy_at_zero_still_drafts_now_and_then():
    policy = policy_with({0: 1.0, 3: 4.0}, drafted=100, accepted=0)
    chosen = []
    for _ in range(32):
        chosen.append(policy.choose())
        policy.record(chosen[-1], 1.0 if chosen[-1] == 0 else 2.0, chosen[-1], 0)
    assert chosen.count(1) == 2 and chosen.count(0) == 30


# -- in speculative decoding ------------------------------------------------------------------------


def causal_lm(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
                         eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().double()


def greedy(model, ids, mask, new):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0)


def test_goodput_decoding_is_the_targets_own_greedy_at_batch_one_and_in_a_padded_batch():
    target, draft = causal_lm(0), causal_lm(1, layers=1)
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[2, :2] = 0
    out = speculative_generate(target, ids[:1], draft=draft, num_draft_tokens=3, max_new_tokens=24,
                               draft_policy="goodput")
    assert torch.equal(out.sequences, greedy(target, ids[:1], mask[:1], 24))
    assert 0 <= out.stats["mean_draft_length"] <= 3
    out = speculative_generate(target, ids, attention_mask=mask, draft=draft, num_draft_tokens=3, max_new_tokens=24,
                               pad_token_id=0, draft_policy="goodput")
    assert torch.equal(out.sequences, greedy(target, ids, mask, 24))


def test_a_draft_that_is_always_wrong_is_soon_not_run():
    """A draft that never agrees (another random model): after measuring both ends, the policy
    drafts nothing in most rounds, where the fixed length drafts in every one."""
    target, draft = causal_lm(0), causal_lm(5, layers=1)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    out = speculative_generate(target, ids, draft=draft, num_draft_tokens=3, max_new_tokens=40, draft_policy="goodput")
    assert torch.equal(out.sequences, greedy(target, ids, torch.ones_like(ids), 40))
    assert out.stats["acceptance_rate"] < 0.2
    assert out.stats["rounds_without_drafting"] > 0.6


def test_prompt_lookup_on_a_repeating_text_keeps_drafting_in_full():
    """Where prompt lookup's proposals are the target's own tokens, drafting costs little and yields
    much: the longest draft wins."""
    target = causal_lm(0)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    text = greedy(target, ids, torch.ones_like(ids), 30)  # the target's own continuation, twice
    ids = torch.cat([text, text[:, :9]], dim=1)
    out = speculative_generate(target, ids, prompt_lookup=3, num_draft_tokens=3, max_new_tokens=18,
                               draft_policy="goodput")
    assert torch.equal(out.sequences, greedy(target, ids, torch.ones_like(ids), 18))
    assert out.stats["acceptance_rate"] > 0.6 and out.stats["mean_draft_length"] > 2, out.stats


def test_the_patch_passes_the_policy_and_refuses_unknown_ones():
    target, draft = causal_lm(0), causal_lm(1, layers=1)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(6))
    with accel.patched(target, speculative={"draft": draft, "num_draft_tokens": 3, "draft_policy": "goodput"}):
        out = target.generate(ids, max_new_tokens=12, do_sample=False)
        stats = accel.describe(target)["methods"]["speculative"]["last_call"]
    assert torch.equal(out, greedy(target, ids, torch.ones_like(ids), 12))
    assert "mean_draft_length" in stats
    with pytest.raises(ValueError, match="draft_policy"):
        accel.patch(target, speculative={"draft": draft, "draft_policy": "fastest"})
    assert not accel.describe(target)["methods"]
    with pytest.raises(ValueError, match="draft_policy"):
        speculative_generate(target, ids, draft=draft, draft_policy="fastest")
