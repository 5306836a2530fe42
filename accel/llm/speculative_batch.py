"""Speculative decoding, greedy or sampled, for a batch whose rows accept different numbers of tokens.

transformers' caches crop every row by the same amount (``DynamicCache.crop``), which is why its
assisted generation refuses batches. Here each model's cache only grows: every round appends the
same number of positions to every row. A per-position validity mask marks what each row really
holds, so a row's rejected drafts, its left padding and the fillers of shorter proposals stay in
the cache as masked holes. Each row's next position id is its count of valid positions, so its
rotary positions run on as if the holes were not there. In exact arithmetic every row computes
what ``generate`` computes for it, left padding included. Verifying several tokens at once changes
the shapes of the products, so equality is tested in float64.

Rows that finish (an end-of-sequence token, or ``max_new_tokens``) leave the batch: every cache
keeps only the rows still decoding (``batch_select_indices``), so the passes that remain are over
fewer rows. Speculation makes rows finish at different passes, and the batch would otherwise pay
for its finished rows until the slowest one is done. The output is padded with ``pad_token_id``
after each row's end, as ``generate`` pads it.
"""
from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence, Set, Tuple

import torch

from .draft_policy import GoodputPolicy
from .eagle import EagleBatchProposer, EagleHead
from .speculative import (HYBRID_SHORTEST, Sampler, SpeculativeOutput, _forward, _until_stop, greedy_accept,
                          prompt_lookup_proposal, request_stats, top_probability, verify_sampled)

__all__ = ["generate_batch"]


class _MaskedCache:
    """One model's KV cache with the validity of each position, per row (``valid [B, T]``)."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache, self.valid = model, None, None
        self.mark = 0  # a position index the caller keeps (the draft's first fed-back proposal)

    def step(self, tokens: torch.Tensor, real: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Append ``tokens: [B, n]``, of which ``real: [B, n]`` count; the logits of the last ``keep``
        positions (0: all) ``[B, keep, V]``."""
        held = real.new_zeros(real.shape[0], 0) if self.valid is None else self.valid
        mask = torch.cat([held, real], dim=1)
        # each token's position: the real positions before it in its row
        positions = (held.sum(1, keepdim=True) + real.long().cumsum(1) - 1).clamp_min(0)
        logits, self.cache = _forward(self.model, tokens, self.cache, keep, attention_mask=mask.long(),
                                      position_ids=positions)
        self.valid = mask
        return logits

    def forget(self, row: int, start: int, stop: int) -> None:
        """Mark positions ``start:stop`` of ``row`` as never held (rejected drafts)."""
        self.valid[row, start:stop] = False

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ``[n]`` (in that order), dropping the others' cache."""
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]


@torch.no_grad()
def generate_batch(target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, draft: Optional[Any],
                   prompt_lookup: Optional[int], num_draft_tokens: int, max_new_tokens: int, stops: Set[int],
                   pad_token_id: int, sampler: Optional[Sampler] = None,
                   draft_confidence: float = 0.0, draft_policy: str = "fixed") -> SpeculativeOutput:
    """Speculative decoding of ``input_ids: [B, L]`` (left-padded; ``attention_mask`` 1 on the real
    tokens). Greedy (``sampler=None``): the tokens of ``target.generate(input_ids, attention_mask=...,
    do_sample=False)``. With a ``Sampler``: speculative sampling row by row, each row's tokens
    distributed as the target samples them. A draft model stops drafting for a row after a token
    it gave a probability below ``draft_confidence``. ``draft_policy="goodput"``: each pass drafts
    the length with the most measured tokens per second (``accel.llm.draft_policy``)."""
    policy = GoodputPolicy(num_draft_tokens) if draft_policy == "goodput" else None
    if isinstance(draft, EagleHead):
        eagle = EagleBatchProposer(draft, target)
        eagle.attach()
        try:
            return _generate(target, input_ids, attention_mask, eagle, prompt_lookup, num_draft_tokens,
                             max_new_tokens, stops, pad_token_id, sampler, draft_confidence, policy)
        finally:
            eagle.detach()
    return _generate(target, input_ids, attention_mask, None if draft is None else _MaskedCache(draft),
                     prompt_lookup, num_draft_tokens, max_new_tokens, stops, pad_token_id, sampler, draft_confidence,
                     policy)


def _generate(target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, drafter: Any,
              prompt_lookup: Optional[int], num_draft_tokens: int, max_new_tokens: int, stops: Set[int],
              pad_token_id: int, sampler: Optional[Sampler], draft_confidence: float,
              policy: Optional[GoodputPolicy] = None) -> SpeculativeOutput:
    """``generate_batch`` with ``drafter`` a ``_MaskedCache`` over a draft model, an
    ``EagleBatchProposer`` (which reads the target's features from its hook) or None.

    The per-row lists (``made``, ``history``, ``unseen``) and every cache hold the rows still
    decoding, in their original order; ``origin`` maps each to its row of ``input_ids``."""
    batch = input_ids.shape[0]
    real = attention_mask.bool()
    eagle = isinstance(drafter, EagleBatchProposer)
    verifier = _MaskedCache(target)
    first = verifier.step(input_ids, real, keep=1)[:, -1]  # each row's newest token, not yet in the target's cache
    last = first.argmax(-1).tolist() if sampler is None else [sampler.draw(p) for p in sampler.probs(first)]
    made: List[List[int]] = [[int(t)] for t in last]
    history = [input_ids[b][real[b]].tolist() + made[b] for b in range(batch)]
    unseen: List[List[int]] = [[] for _ in range(batch)]  # tokens of each row the draft model has not read yet
    if eagle:  # the head reads each prompt's features with the token after each position
        drafter.observe([(drafter.features[b][real[b]], history[b][1:]) for b in range(batch)])
    elif drafter is not None:
        drafter.step(input_ids, real, keep=1)  # reads the prompts; its first guess comes next round
        unseen = [[made[b][-1]] for b in range(batch)]
    origin = list(range(batch))
    finished: List[Optional[List[int]]] = [None] * batch  # each row's tokens, once it has ended
    accepted_rows = [0] * batch
    calls, drafted, accepted, checks = 1, 0, 0, 0
    filler = int(last[0])
    ended = [made[b][-1] in stops or max_new_tokens == 1 for b in range(batch)]
    _leave(ended, origin, finished, made, history, unseen, verifier, drafter)
    while origin:
        began = time.perf_counter()
        rows = len(origin)
        length_now = num_draft_tokens if policy is None else policy.choose(rows)
        round_drafted, round_accepted = drafted, accepted
        room = [min(length_now, max_new_tokens - len(made[b]) - 1) for b in range(rows)]
        proposals, draft_probs, looked_up = _propose(drafter, unseen, history, room, prompt_lookup, filler,
                                                     input_ids.device, sampler, draft_confidence)
        width = max(len(p) for p in proposals)
        tokens = torch.full((rows, 1 + width), filler, dtype=torch.long, device=input_ids.device)
        counted = torch.zeros(rows, 1 + width, dtype=torch.bool, device=input_ids.device)
        for b in range(rows):
            tokens[b, 0], counted[b, 0] = history[b][-1], True
            tokens[b, 1:1 + len(proposals[b])] = torch.tensor(proposals[b], dtype=torch.long)
            counted[b, 1:1 + len(proposals[b])] = True
        start = verifier.valid.shape[1]
        logits = verifier.step(tokens, counted)
        choices = logits.argmax(-1).tolist() if sampler is None else None
        calls += 1
        observed: List[Any] = [None] * rows  # the EAGLE head's new true pairs, per row
        ended = [False] * rows
        for b in range(rows):
            checks += 1
            proposal = proposals[b]
            if sampler is None:
                kept, produced = greedy_accept(proposal, choices[b], stops)
            else:
                target_probs = sampler.probs(logits[b, :1 + len(proposal)])
                kept, following = verify_sampled(proposal, draft_probs[b], target_probs, sampler)
                produced = _until_stop(proposal[:kept] + [following], stops)
            drafted, accepted = drafted + len(proposal), accepted + min(kept, len(produced))
            accepted_rows[origin[b]] += min(kept, len(produced))
            verifier.forget(b, start + 1 + kept, start + 1 + width)  # rejected drafts and fillers
            if eagle:
                observed[b] = (drafter.features[b, :len(produced)], produced)
            elif drafter is not None and looked_up[b]:
                unseen[b] += produced  # the draft read none of this round's tokens
            elif drafter is not None:
                _settle_draft(drafter, b, proposal, kept, produced, unseen)
            made[b] += produced
            history[b] += produced
            ended[b] = produced[-1] in stops or len(made[b]) >= max_new_tokens
        live = _leave(ended, origin, finished, made, history, unseen, verifier, drafter)
        if eagle and origin:
            drafter.observe([observed[b] for b in live])
        if policy is not None:
            policy.record(length_now, time.perf_counter() - began, drafted - round_drafted, accepted - round_accepted,
                          rows)
    longest = max(len(m) for m in finished)
    new = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=input_ids.device)
    for b in range(batch):
        new[b, :len(finished[b])] = torch.tensor(finished[b], dtype=torch.long)
    stats = request_stats(calls, drafted, accepted, checks, sum(len(m) for m in finished))
    stats["accepted_per_row"] = accepted_rows
    if policy is not None:
        stats.update(policy.summary())
    return SpeculativeOutput(torch.cat([input_ids, new], dim=1), stats)


def _leave(ended: List[bool], origin: List[int], finished: List[Optional[List[int]]], made: List[List[int]],
           history: List[List[int]], unseen: List[List[int]], verifier: _MaskedCache, drafter: Any) -> List[int]:
    """Rows that ``ended`` leave the batch: their tokens go to ``finished`` (by original row), and
    every per-row list and cache keeps the others, in order, which it returns (positions in the
    batch before)."""
    live = [b for b, end in enumerate(ended) if not end]
    if len(live) == len(ended):
        return live
    for b, end in enumerate(ended):
        if end:
            finished[origin[b]] = made[b]
    if live:
        index = torch.tensor(live, dtype=torch.long, device=verifier.valid.device)
        verifier.keep_rows(index)
        if drafter is not None:
            drafter.keep_rows(index)
    for rows in (origin, made, history, unseen):
        rows[:] = [rows[b] for b in live]
    return live


def _propose(drafter: Any, unseen: List[List[int]], history: List[List[int]],
             room: Sequence[int], prompt_lookup: Optional[int], filler: int, device: torch.device,
             sampler: Optional[Sampler], confidence: float
             ) -> Tuple[List[List[int]], List[Optional[torch.Tensor]], List[bool]]:
    """Each row's proposal (up to ``room[b]`` tokens); when sampling with
    a draft model, the draft's distributions ``[len(proposal), V]`` it drew them from (None where
    the proposal is certain: prompt lookup); and which rows' proposals came from prompt lookup.
    With both proposers, prompt lookup serves the rows where an n-gram of at least
    ``HYBRID_SHORTEST`` tokens recurs and the draft the others. A row stops drafting after a token
    drawn with probability below ``confidence``."""
    batch = len(history)
    probs: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    shortest = 1 if drafter is None else HYBRID_SHORTEST
    proposals = [[] if room[b] <= 0 or prompt_lookup is None else
                 prompt_lookup_proposal(history[b], prompt_lookup, room[b], shortest) for b in range(batch)]
    looked_up = [bool(p) for p in proposals]
    if drafter is None:
        return proposals, [None] * batch, looked_up
    room = [0 if looked_up[b] else room[b] for b in range(batch)]
    count = max(room)
    if count <= 0:
        return proposals, [None] * batch, looked_up
    if isinstance(drafter, EagleBatchProposer):
        guessed, drawn = drafter.propose(room, sampler, confidence)
        return [guessed[b] if room[b] > 0 else proposals[b] for b in range(batch)], drawn, looked_up
    # first step: every row's unseen tokens (more after prompt-lookup rounds), right-aligned, fillers masked
    width = max(1, max(len(u) for u in unseen))
    tokens = torch.full((batch, width), filler, dtype=torch.long, device=device)
    counted = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for b, pending in enumerate(unseen):
        if pending:
            tokens[b, width - len(pending):] = torch.tensor(pending, dtype=torch.long)
            counted[b, width - len(pending):] = True
    for step in range(count):
        logits = drafter.step(tokens, counted, keep=1)[:, -1]
        if sampler is None:
            guess = logits.argmax(-1).tolist()
            sure = (top_probability(logits) >= confidence).tolist() if confidence else [True] * batch
        else:
            row_probs = sampler.probs(logits)
            guess = [sampler.draw(p) for p in row_probs]
            sure = [float(row_probs[b, guess[b]]) >= confidence for b in range(batch)]
        if step == 0:
            drafter.mark = drafter.valid.shape[1]  # where the proposals fed back as inputs begin
        for b in range(batch):
            if step < room[b]:
                proposals[b].append(guess[b])
                if sampler is not None:
                    probs[b].append(row_probs[b])
                if not sure[b]:
                    room[b] = step + 1  # this row's proposal ends here
        if step == count - 1 or all(room[b] <= step + 1 for b in range(batch)):
            break
        tokens = torch.tensor([[g] for g in guess], dtype=torch.long, device=device)
        # a proposal goes in as the next input only where the row wants one more after it
        counted = torch.tensor([[step < room[b] - 1] for b in range(batch)], device=device)
    for b in range(batch):
        unseen[b] = []
    return proposals, [torch.stack(p) if p else None for p in probs], looked_up


def _settle_draft(drafter: _MaskedCache, row: int, proposal: List[int], kept: int, produced: List[int],
                  unseen: List[List[int]]) -> None:
    """After verification: the draft read its row's proposal up to the one before last; unmark the
    rejected ones and note what it has not read (the last accepted draft if all were, and the
    target's own token)."""
    count = len(proposal)
    if count:  # proposals 1..count-1 went in as inputs from drafter.mark on (the last was never fed)
        drafter.forget(row, drafter.mark + min(kept, count - 1), drafter.valid.shape[1])
    unseen[row] += ([proposal[-1]] if count and kept == count else []) + [produced[-1]]
