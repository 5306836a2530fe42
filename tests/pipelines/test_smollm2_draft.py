"""The shipped draft for SmolLM2-135M-Instruct (``assets/smollm2-draft``): an ordinary transformers
causal LM over the target's vocabulary, exact as a draft for greedy speculative decoding of the
real target, trained (it agrees with the target on held-out requests), and usable by transformers'
own assisted generation."""
from __future__ import annotations

import pytest
import torch

import accel
from accel.llm.speculative import speculative_generate
from accel.pipelines.smollm2_draft import ASSET_DIR, heldout_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(load_built_in_lm):
    target, tokenizer = load_built_in_lm("smollm2-135m")
    draft, draft_tokenizer = load_built_in_lm("smollm2-draft")
    return target, draft, tokenizer, draft_tokenizer


@pytest.fixture(scope="module")
def heldout(pair):
    """Three held-out requests, as the benchmark builds them."""
    return heldout_prompts(pair[2], 3)


def test_it_is_a_small_causal_lm_over_the_targets_vocabulary(pair):
    from transformers import GenerationMixin

    target, draft, tokenizer, draft_tokenizer = pair
    assert isinstance(draft, GenerationMixin) and not draft.training
    assert draft.config.vocab_size == target.config.vocab_size == 49152
    assert len(draft_tokenizer) == len(tokenizer) and draft_tokenizer.eos_token_id == tokenizer.eos_token_id
    parameters = sum(p.numel() for p in draft.parameters())
    assert parameters < 5_000_000 and parameters * 2 / 1e6 < (ASSET_DIR / "model.safetensors").stat().st_size / 1e6 + 1
    assert draft.lm_head.weight is draft.model.embed_tokens.weight
    assert set(draft.config.draft_ids) >= set(tokenizer.all_special_ids)


def test_its_logits_are_a_plain_llama_on_the_kept_ids_scattered_into_the_vocabulary(pair):
    """Against a plain ``LlamaForCausalLM`` over the kept ids (plus "unknown") with the same
    weights, fed the ids mapped by hand: equal at the kept ids, -inf elsewhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    draft = pair[1]
    kept = list(draft.config.draft_ids)
    plain = LlamaForCausalLM(LlamaConfig(**{**draft.config.to_dict(), "vocab_size": len(kept) + 1,
                                            "pad_token_id": None})).eval()
    plain.load_state_dict(draft.state_dict(), strict=False)
    plain.lm_head.weight = plain.model.embed_tokens.weight
    unknown = next(i for i in range(49152) if i not in set(kept))
    ids = torch.tensor([[kept[5], kept[100], unknown, kept[-1], unknown + 1 if unknown + 1 not in kept else unknown]])
    position = {token: i for i, token in enumerate(kept)}
    mapped = torch.tensor([[position.get(int(t), len(kept)) for t in ids[0]]])
    with torch.no_grad():
        ours, reference = draft(ids).logits, plain(mapped).logits
    assert ours.shape == (1, 5, 49152)
    assert torch.equal(ours[..., kept], reference[..., :-1])
    outside = torch.ones(49152, dtype=torch.bool)
    outside[kept] = False
    assert bool(torch.isneginf(ours[..., outside]).all())


def test_greedy_speculation_with_it_is_the_targets_own_greedy(pair, heldout):
    """Token for token, on held-out requests; drafts are accepted far more often than chance (an
    untrained draft of the same shape would propose one of 8,192 ids and be accepted about never;
    the shipped one is accepted about 11% of the time in the benchmark, 33.5% teacher-forced)."""
    target, draft = pair[0], pair[1]
    accepted = drafted = 0
    for ids in heldout:
        with torch.no_grad():
            expected = target.generate(ids, max_new_tokens=24, do_sample=False)
        out = speculative_generate(target, ids, draft=draft, num_draft_tokens=4, max_new_tokens=24)
        same = torch.equal(out.sequences, expected)
        if not same:  # verifying several tokens at once may only flip a near-tie of the target's logits
            at = int((out.sequences[0] != expected[0]).nonzero()[0])
            with torch.no_grad():
                top2 = target(expected[:, :at]).logits[0, -1].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, f"diverged at {at} with a logit gap of {float(top2[0] - top2[1])}"
        accepted, drafted = accepted + out.stats["accepted"], drafted + out.stats["drafted"]
    assert accepted / drafted > 0.05, (accepted, drafted)


def test_transformers_assisted_generation_runs_the_same_pair(pair, heldout):
    target, draft = pair[0], pair[1]
    ids = heldout[0]
    with torch.no_grad():
        expected = target.generate(ids, max_new_tokens=12, do_sample=False)
        assisted = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, expected)


def test_patching_the_target_with_it_serves_a_batch(pair, heldout):
    """accel.patch(target, speculative=draft) on two held-out requests as a left-padded batch."""
    target, draft, tokenizer = pair[0], pair[1], pair[2]
    width = max(ids.shape[1] for ids in heldout[:2])
    ids = torch.full((2, width), tokenizer.eos_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate(heldout[:2]):
        ids[b, width - row.shape[1]:], mask[b, width - row.shape[1]:] = row[0], 1
    with torch.no_grad():
        expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    with accel.patched(target, speculative=draft):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, expected)


def test_a_config_without_valid_draft_ids_is_refused():
    from accel.pipelines.smollm2_draft import SmolLM2Draft, draft_config

    with pytest.raises(ValueError, match=r"config.draft_ids: expected distinct ids in \[0, 49152\)"):
        SmolLM2Draft(draft_config([]))
    with pytest.raises(ValueError, match="config.draft_ids"):
        SmolLM2Draft(draft_config([5, 5, 7]))
    with pytest.raises(ValueError, match="config.draft_ids"):
        SmolLM2Draft(draft_config([3, 49152]))
