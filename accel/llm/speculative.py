"""Speculative decoding (Leviathan et al., ICML 2023; Chen et al. 2023): a cheap proposer drafts
``k`` tokens, the target model checks them all in one forward pass, and the longest prefix it
agrees with is kept, plus the target's own next token. Greedy output is the target's own greedy
output, token for token; each target forward yields between 1 and ``k + 1`` tokens.

    out = speculative_generate(target, input_ids, draft=draft_model, max_new_tokens=64)
    out = speculative_generate(target, input_ids, prompt_lookup=3, max_new_tokens=64)
    out.sequences, out.stats      # [1, prompt + new] token ids; acceptance rate, mean accepted length

Proposers:
- a draft model: any transformers causal LM with the target's vocabulary, run on its own KV cache
  (``layer_skip_draft`` makes one from the target's own first layers);
- prompt lookup (Saxena 2023): the tokens that followed the latest earlier occurrence of the last
  ``n`` tokens (``n`` from ``prompt_lookup`` down to 1), with no second model. This pays on outputs
  that copy from their input (summaries, edits, code);
- an EAGLE head (``accel.llm.eagle``): one decoder layer that reads the target's own last hidden
  states and predicts the next one;
- both kinds: prompt lookup where an n-gram of two tokens or more recurs, the draft model or head
  elsewhere.

Both models keep their KV caches (transformers' ``DynamicCache``) across rounds, and rejected
positions are cropped from them.

Why verifying several tokens pays: a decoding step reads every weight of the target to compute one
row. On a GPU a pass over 5 rows costs about what a pass over one does; on the CPU it does too,
once the linear layers are computed with the weight on the left (``few_rows=True``,
``accel.kernels.few_rows_linear``). With torch's own ``F.linear``, SmolLM2-135M's pass over 2 to 8
positions measured 1.3 to 1.9 times its pass over one on this project's CPU (docs/benchmarks.md).
A pass of several masked queries would also copy every layer's KV cache in transformers' ``sdpa``
attention of a grouped-query model; the target runs ``accel.llm.grouped_attention`` instead.

What it serves:
- greedy decoding, token for token the target's ``generate``, at batch size 1 and for left-padded
  batches, where each row accepts its own number of drafted tokens and rows that finish leave the
  batch (``speculative_batch``);
- sampling at any batch size by speculative sampling: the target's distribution, with
  temperature, top-k and top-p applied identically to both models;
- draft lengths: fixed, cut where the draft is unsure (``draft_confidence``), or chosen each pass
  by measured goodput (``draft_policy="goodput"``, the one that pays at batch 8 on a CPU);
- the shipped draft for the built-in model (``accel.pipelines.load("smollm2-draft")``) and its
  shipped EAGLE head (``load("smollm2-eagle")``).
Self-speculation drafts with the model's own first layers (``layer_skip_draft``); untrained it
agrees too rarely to pay, and no exit adapters are trained.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch

from ..kernels.linear import takes_few_rows, weight_left_linear
from .draft_policy import GoodputPolicy
from .eagle import EagleHead, EagleProposer, check_head
from .grouped_attention import grouped_query_attention

__all__ = ["SpeculativeOutput", "Sampler", "speculative_generate", "verify_sampled", "prompt_lookup_proposal",
           "layer_skip_draft", "few_rows_linears"]


@dataclasses.dataclass
class SpeculativeOutput:
    """``sequences``: ``[1, prompt + new]`` token ids, as ``generate`` returns them. ``stats``: the
    request's figures, with vLLM's definitions:
    - ``target_calls``: target forward passes, the prompt's included;
    - ``drafted`` and ``accepted``: draft tokens proposed and kept;
    - ``acceptance_rate``: accepted / drafted;
    - ``mean_accepted_length``: tokens produced per verification pass (1 + accepted / rounds)."""

    sequences: torch.Tensor
    stats: Dict[str, float]


def _truncate(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of a transformers cache. A negative ``crop`` removes that
    many positions in every transformers version (a positive one meant the length to keep before
    5.2x and is refused since)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


@functools.lru_cache(maxsize=None)
def _keywords(model_class: type) -> Tuple[str, bool]:
    """The keyword a model's ``forward`` takes its KV cache by (``cache`` in transformers' newer
    models, where ``past_key_values`` is deprecated), and whether it takes ``logits_to_keep``."""
    parameters = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def _few_rows_hook(module: Any, call_next: Any, x: torch.Tensor) -> torch.Tensor:
    if takes_few_rows(x, module.weight):
        return weight_left_linear(x, module.weight, module.bias)
    return call_next(x)


@contextlib.contextmanager
def few_rows_linears(model: Any, on: bool = True) -> Iterator[int]:
    """While inside, ``model``'s ``nn.Linear`` layers (exactly that class: subclasses such as quantised
    layers keep their own forward) compute inputs of a few rows on the CPU with
    ``accel.kernels.few_rows_linear``: a verification pass of a few positions, or a decoding step.
    Yields how many layers it hooked; the model is as it was afterwards, errors included."""
    from ..hooks import HookGroup

    hooks = HookGroup()
    try:
        if on:
            for module in model.modules():
                if type(module) is torch.nn.Linear:
                    hooks.add(module, _few_rows_hook)
        yield len(hooks)
    finally:
        hooks.remove_all()


def _forward(model: Any, ids: torch.Tensor, cache: Any, keep: int = 0, **inputs: Any):
    """``model`` on ``ids: [B, n]`` after ``cache`` (and ``inputs`` such as an attention mask and
    position ids): the logits of the last ``keep`` positions (0: all) ``[B, keep, V]`` and the grown
    cache. The prompt's pass keeps one: projecting every prompt position onto the vocabulary would
    cost more than the rest of the pass on a small model."""
    cache_keyword, takes_keep = _keywords(type(model))
    if keep and takes_keep:
        inputs["logits_to_keep"] = keep
    if cache is not None:
        inputs[cache_keyword] = cache
    out = model(input_ids=ids, use_cache=True, **inputs)
    grown = getattr(out, "past_key_values", None)
    return out.logits, grown if grown is not None else getattr(out, "cache", None)


def greedy_accept(proposal: Sequence[int], choices: Sequence[int], stops: Set[int]) -> Tuple[int, List[int]]:
    """The target's greedy check of ``proposal`` given its choice after each checked position
    (``choices``, one more than the proposal): how many drafts it kept, and the tokens produced (the
    kept drafts and its own next token), cut right after an end-of-sequence token as ``generate``
    stops there."""
    kept = 0
    while kept < len(proposal) and proposal[kept] == choices[kept]:
        kept += 1
    return kept, _until_stop(list(proposal[:kept]) + [choices[kept]], stops)


def _until_stop(produced: List[int], stops: Set[int]) -> List[int]:
    for i, token in enumerate(produced):
        if token in stops:
            return produced[:i + 1]
    return produced


def request_stats(calls: int, drafted: int, accepted: int, checks: int, new: int) -> Dict[str, Any]:
    """A request's figures, with vLLM's definitions (``checks``: verifications of a row)."""
    return {"target_calls": calls, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": 1 + accepted / checks if checks else 1.0, "new_tokens": new}


def prompt_lookup_proposal(tokens: Sequence[int], ngram: int, count: int, shortest: int = 1) -> List[int]:
    """Up to ``count`` tokens that followed the latest earlier occurrence of the last ``n`` tokens
    of ``tokens``, trying ``n = ngram`` down to ``shortest``; empty if none recurs."""
    for n in range(min(ngram, len(tokens) - 1), shortest - 1, -1):
        suffix = list(tokens[-n:])
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first, the suffix itself excluded
            if list(tokens[start:start + n]) == suffix:
                follow = list(tokens[start + n:start + n + count])
                if follow:
                    return follow
    return []


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Sampling as transformers' ``generate(do_sample=True)`` does it: the logits divided by
    ``temperature``, then only the ``top_k`` largest kept, then the smallest set whose probability
    reaches ``top_p`` (at least one token), in that order; draws from ``generator`` (None: torch's
    global generator)."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None

    def __post_init__(self) -> None:
        from ..patches.settings import check_int, check_real

        check_real("Sampler", "temperature", self.temperature, lambda v: 0 < v < float("inf"), "a finite float > 0")
        if self.top_k is not None:
            check_int("Sampler", "top_k", self.top_k, 1)
        if self.top_p is not None:
            check_real("Sampler", "top_p", self.top_p, lambda v: 0 < v <= 1, "a float in (0, 1]")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n, V]`` logits -> ``[n, V]`` probabilities (float32 at least)."""
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits.clone()
        if self.temperature != 1.0:
            x = x / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = x.sort(dim=-1)  # ascending, as transformers' top-p
            dropped = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            dropped[..., -1] = False  # keep at least the most likely token
            x = x.masked_fill(dropped.scatter(-1, order, dropped), float("-inf"))
        return x.softmax(dim=-1)

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def verify_sampled(proposal: Sequence[int], draft_probs: Optional[torch.Tensor], target_probs: torch.Tensor,
                   sampler: Sampler) -> Tuple[int, int]:
    """Speculative sampling's check (Leviathan et al. 2023, Alg. 1): draft token ``i`` is kept with
    probability ``min(1, p_i(d) / q_i(d))``; at the first rejection the next token is drawn from
    ``norm(max(0, p_i - q_i))``, and after all are kept from ``p_k``. ``draft_probs`` ``[k, V]``
    (None: each proposal was certain, as prompt lookup's), ``target_probs`` ``[k + 1, V]``. Returns
    (tokens kept, the next token); the tokens come out distributed as the target samples them."""
    for i, token in enumerate(proposal):
        q = 1.0 if draft_probs is None else float(draft_probs[i, token])
        p = float(target_probs[i, token])
        if sampler.uniform() * q < p:  # accepted with probability min(1, p / q)
            continue
        residual = target_probs[i].clone()
        if draft_probs is None:
            residual[token] = 0.0  # max(0, p - onehot(d))
        else:
            residual = (residual - draft_probs[i]).clamp_min(0.0)
        total = float(residual.sum())
        return i, sampler.draw(residual / total if total > 0 else target_probs[i])
    return len(proposal), sampler.draw(target_probs[len(proposal)])


def layer_skip_draft(model: Any, layers: int) -> Any:
    """Self-speculation (after Draft & Verify, Zhang et al. 2024, and LayerSkip, Elhoushi et al.
    2024): the model's own first ``layers`` decoder layers, then its final norm and head, as a
    draft. It shares every weight with the model and costs no memory but its KV cache.

    Untrained, a truncated model agrees poorly with the whole one: SmolLM2-135M cut after 10 of 30
    layers agrees with its greedy choice on few tokens (docs/benchmarks.md). The draft is a shallow
    copy of ``model`` with its own config (``num_hidden_layers = layers``); the model is untouched."""
    from ..patches.settings import check_int

    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    total = len(getattr(inner, "layers", []))
    if not total or not hasattr(model, "config"):
        raise TypeError(f"layer_skip_draft: model must be a transformers decoder LM with .{model.base_model_prefix}"
                        f".layers; got {type(model).__name__}")
    check_int("layer_skip_draft", "layers", layers, 1, f"an int in [1, {total - 1}] (the model has {total})")
    if layers >= total:
        raise ValueError(f"layer_skip_draft: layers must be an int in [1, {total - 1}] (the model has {total}); "
                         f"got {layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers  # transformers' decoders run self.layers[:num_hidden_layers]
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    draft_inner = copy.copy(inner)
    draft_inner._modules = dict(inner._modules)  # its own module table: the model's stays as it is
    draft_inner.config = config
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft._modules[model.base_model_prefix] = draft_inner
    draft.config = config
    return draft


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """The softmax probability of the largest of ``logits: [..., V]``, ``[...]``: 1 / sum(exp(logits -
    max)), without the softmax tensor."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return 1.0 / (logits - logits.amax(-1, keepdim=True)).exp().sum(-1)


class _DraftModel:
    """A draft LM run greedily on its own cache, which always holds a prefix of the sequence."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache, self.length = model, None, 0

    def propose(self, tokens: torch.Tensor, count: int, sampler: Optional[Sampler] = None,
                confidence: float = 0.0) -> Tuple[List[int], Optional[torch.Tensor]]:
        """Up to ``count`` tokens after ``tokens: [1, L]``: greedy, or drawn with ``sampler`` (then
        also their distributions ``[count, V]``); drafting stops after a token the draft gave a
        probability below ``confidence``."""
        pending = tokens[:, self.length:]  # what the cache has not seen yet (at least the last token)
        proposal: List[int] = []
        probs: List[torch.Tensor] = []
        for _ in range(count):
            logits, self.cache = _forward(self.model, pending, self.cache, keep=1)
            self.length += pending.shape[1]
            if sampler is None:
                proposal.append(int(logits[0, -1].argmax()))
                sure = not confidence or float(top_probability(logits[0, -1])) >= confidence
            else:
                probs.append(sampler.probs(logits[0, -1:])[0])
                proposal.append(sampler.draw(probs[-1]))
                sure = float(probs[-1][proposal[-1]]) >= confidence
            if not sure:
                break
            pending = tokens.new_tensor([[proposal[-1]]])
        return proposal, (torch.stack(probs) if probs else None)

    def keep(self, length: int) -> None:
        """Forget every position from ``length`` on (rejected drafts)."""
        if self.cache is not None and self.length > length:
            _truncate(self.cache, length)
            self.length = length


# With a draft model too, prompt lookup proposes only on matches of at least this many tokens: a
# one-token match guesses worse than the draft (on the built-in pair's held-out requests, lookup of
# 3- down to 2-grams, else the draft, agreed with the target on 64% of tokens where the draft alone
# agreed on 48%, and down to 1-grams on 58%; scripts/train_smollm2_draft.py, step 600).
HYBRID_SHORTEST = 2
DRAFT_POLICIES = ("fixed", "goodput")  # a fixed draft length, or the one with the most measured goodput


@torch.no_grad()
def speculative_generate(target: Any, input_ids: torch.Tensor, *, draft: Optional[Any] = None,
                         prompt_lookup: Optional[int] = None, num_draft_tokens: int = 4, max_new_tokens: int = 32,
                         eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                         sampler: Optional[Sampler] = None, attention_mask: Optional[torch.Tensor] = None,
                         pad_token_id: Optional[int] = None, draft_confidence: float = 0.0,
                         few_rows: bool = True, draft_policy: str = "fixed") -> SpeculativeOutput:
    """Decoding of ``target`` from ``input_ids: [B, L]`` (left-padded, ``attention_mask`` 1 on the
    real tokens, when B > 1) with drafts from ``draft`` (a causal LM sharing the target's
    vocabulary), from ``prompt_lookup`` (the longest n-gram to match), or from both (prompt lookup
    where an n-gram of at least ``HYBRID_SHORTEST`` tokens recurs, the draft elsewhere), stopping
    after ``eos_token_id`` (default: the target's generation config's) or ``max_new_tokens``.

    Greedy (``sampler=None``): the tokens of ``target.generate(input_ids, do_sample=False, ...)``,
    finished rows padded with ``pad_token_id`` (default: the generation config's, else the
    end-of-sequence token) as ``generate`` pads them.
    With a ``Sampler``: speculative sampling, whose tokens are distributed as the target's own
    sampling with the same temperature, top-k and top-p (applied identically to the draft).

    Adaptive draft length: a draft model stops drafting, for a row, after a token it gave a
    probability below ``draft_confidence`` (0: always ``num_draft_tokens``), so passes where the
    draft is unsure verify fewer positions and run the draft fewer times. Prompt lookup proposes
    only what it finds (nothing where no n-gram recurs). ``num_draft_tokens=0`` runs the same loop
    without drafting, one target pass per token: it measures the loop's own overhead.

    ``draft_policy="goodput"``: each pass drafts the length, up to ``num_draft_tokens`` and 0
    included, with the most expected tokens per second, from the round times and the acceptance
    measured so far in the call (``accel.llm.draft_policy``), so that drafting is cut down where it
    costs more than it gains (larger batches on a CPU). ``"fixed"``: always ``num_draft_tokens``.

    ``few_rows``: on the CPU, the target's linear layers run its passes of a few positions (the
    decoding steps and verifications, not the prompt's) as ``weight @ x^T``
    (``accel.kernels.few_rows_linear``), which made SmolLM2-135M's passes over 1 to 7 positions
    1.35 to 2.2 times faster than ``F.linear`` on this project's CPU (docs/benchmarks.md); False
    keeps ``F.linear``. Either way the
    tokens are the target's, up to the order of the sums, as any change of the pass's width."""
    _check(target, input_ids, draft, prompt_lookup, num_draft_tokens, max_new_tokens, draft_confidence)
    from ..patches.settings import check_bool, check_choice

    check_choice("speculative_generate", "draft_policy", draft_policy, DRAFT_POLICIES)
    with few_rows_linears(target, check_bool("speculative_generate", "few_rows", few_rows)), \
            grouped_query_attention(target):
        return _decode(target, input_ids, draft, prompt_lookup, num_draft_tokens, max_new_tokens, eos_token_id,
                       sampler, attention_mask, pad_token_id, draft_confidence, draft_policy)


def _decode(target: Any, input_ids: torch.Tensor, draft: Optional[Any], prompt_lookup: Optional[int],
            num_draft_tokens: int, max_new_tokens: int, eos_token_id: Any, sampler: Optional[Sampler],
            attention_mask: Optional[torch.Tensor], pad_token_id: Optional[int],
            draft_confidence: float, draft_policy: str = "fixed") -> SpeculativeOutput:
    """``speculative_generate`` after its checks: picks the batch or batch-size-1 loop and proposer."""
    config = getattr(target, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    if input_ids.shape[0] > 1 or (attention_mask is not None and not bool(attention_mask.all())):
        from .speculative_batch import generate_batch

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:  # as generate: the end-of-sequence token pads
            pad_token_id = min(stops) if stops else 0
        return generate_batch(target, input_ids, mask, draft=draft, prompt_lookup=prompt_lookup,
                              num_draft_tokens=num_draft_tokens, max_new_tokens=max_new_tokens, stops=stops,
                              pad_token_id=pad_token_id, sampler=sampler, draft_confidence=draft_confidence,
                              draft_policy=draft_policy)
    if isinstance(draft, EagleHead):
        proposer: Any = EagleProposer(draft, target)
        proposer.attach()
        try:
            return _generate_one(target, input_ids, proposer, prompt_lookup, num_draft_tokens, max_new_tokens, stops,
                                 sampler, draft_confidence, draft_policy)
        finally:
            proposer.detach()
    proposer = _DraftModel(draft) if draft is not None else None
    return _generate_one(target, input_ids, proposer, prompt_lookup, num_draft_tokens, max_new_tokens, stops, sampler,
                         draft_confidence, draft_policy)


def _generate_one(target: Any, input_ids: torch.Tensor, proposer: Any, prompt_lookup: Optional[int],
                  num_draft_tokens: int, max_new_tokens: int, stops: Set[int], sampler: Optional[Sampler],
                  draft_confidence: float, draft_policy: str = "fixed") -> SpeculativeOutput:
    """Batch size 1: ``proposer`` is a ``_DraftModel``, an ``EagleProposer`` or None."""
    policy = GoodputPolicy(num_draft_tokens) if draft_policy == "goodput" else None
    eagle = proposer is not None and not isinstance(proposer, _DraftModel)
    logits, cache = _forward(target, input_ids, None, keep=1)
    first = logits[0, -1].argmax() if sampler is None else sampler.draw(sampler.probs(logits[0, -1:])[0])
    if eagle:
        proposer.start(input_ids, int(first))
    tokens = torch.cat([input_ids, input_ids.new_tensor([[int(first)]])], dim=1)  # the cache holds all but the last
    new, calls, drafted, accepted, rounds = 1, 1, 0, 0, 0
    while new < max_new_tokens and int(tokens[0, -1]) not in stops:
        began = time.perf_counter()
        length_now = num_draft_tokens if policy is None else policy.choose()
        room = min(length_now, max_new_tokens - new - 1)  # the pass adds one token of its own
        draft_probs = None
        if room <= 0:
            proposal = []
        else:
            proposal = [] if prompt_lookup is None else \
                prompt_lookup_proposal(tokens[0].tolist(), prompt_lookup, room, HYBRID_SHORTEST if proposer else 1)
            if not proposal and eagle:
                proposal, draft_probs = proposer.propose(room, sampler, draft_confidence)
            elif not proposal and proposer is not None:
                proposal, draft_probs = proposer.propose(tokens, room, sampler, draft_confidence)
        checked = torch.cat([tokens[:, -1:], tokens.new_tensor([proposal])], dim=1)
        logits, cache = _forward(target, checked, cache)
        calls, rounds = calls + 1, rounds + 1
        if sampler is None:  # the target's token after each checked position
            kept, produced = greedy_accept(proposal, logits[0].argmax(-1).tolist(), stops)
        else:
            kept, following = verify_sampled(proposal, draft_probs, sampler.probs(logits[0]), sampler)
            produced = _until_stop(proposal[:kept] + [following], stops)
        drafted, accepted = drafted + len(proposal), accepted + min(kept, len(produced))
        length = tokens.shape[1]
        tokens = torch.cat([tokens, tokens.new_tensor([produced])], dim=1)
        new += len(produced)
        _truncate(cache, length + kept)  # the checked positions the target agreed with
        if eagle:
            proposer.observe(len(produced) - 1, produced)
        elif proposer is not None:
            proposer.keep(length + min(kept, len(proposal) - 1) if proposal else proposer.length)
        if policy is not None:
            policy.record(length_now, time.perf_counter() - began, len(proposal), min(kept, len(produced)))
    stats = request_stats(calls, drafted, accepted, rounds, new)
    if policy is not None:
        stats.update(policy.summary())
    return SpeculativeOutput(tokens, stats)


def _check(target: Any, input_ids: Any, draft: Any, prompt_lookup: Any, num_draft_tokens: Any,
           max_new_tokens: Any, draft_confidence: Any) -> None:
    from ..patches.settings import check_int, check_real

    if not callable(target) or not hasattr(target, "config"):
        raise TypeError(f"speculative_generate: target must be a transformers causal LM; got {type(target).__name__}")
    if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise TypeError("speculative_generate: input_ids must be a [batch, length] int64 tensor")
    if draft is None and prompt_lookup is None:
        raise ValueError("speculative_generate: give a proposer, draft= (a causal LM) and/or prompt_lookup= "
                         "(an n-gram length)")
    if draft is not None:
        check_draft(draft, target, "speculative_generate")
    if prompt_lookup is not None:
        check_int("speculative_generate", "prompt_lookup", prompt_lookup, low=1)
    check_int("speculative_generate", "num_draft_tokens", num_draft_tokens, low=0)
    check_int("speculative_generate", "max_new_tokens", max_new_tokens, low=1)
    check_real("speculative_generate", "draft_confidence", draft_confidence, lambda v: 0 <= v < 1, "a float in [0, 1)")


def check_draft(draft: Any, target: Any, owner: str) -> None:
    """A ``TypeError`` unless ``draft`` is a causal LM or an ``EagleHead``, and a ``ValueError`` unless
    it fits ``target``: a draft model with the target's vocabulary, a head with its width and
    vocabulary. ``owner`` names the caller in the message. Reads both, changes nothing."""
    if isinstance(draft, EagleHead):
        check_head(draft, target)
        return
    if not callable(draft) or not hasattr(draft, "config"):
        raise TypeError(f"{owner}: draft must be a transformers causal LM or an EagleHead; got {type(draft).__name__}")
    sizes = (getattr(draft.config, "vocab_size", None), getattr(target.config, "vocab_size", None))
    if sizes[0] != sizes[1]:
        raise ValueError(f"{owner}: the draft's vocabulary ({sizes[0]}) differs from the target's ({sizes[1]}); "
                         f"they must share a tokenizer")
