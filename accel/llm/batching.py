"""Continuous batching (Orca, Yu et al., OSDI 2022) over the paged KV cache (vLLM, Kwon et al.,
SOSP 2023) for an unmodified transformers causal LM.

    with ContinuousBatcher(model, tokenizer, block_size=16, num_blocks=1024, max_batch_tokens=512) as engine:
        outs = engine.generate([ids_a, ids_b], max_new_tokens=64)     # greedy; the new tokens of each
        rid = engine.add_request(ids_c, 32, n=4, do_sample=True, temperature=0.8, seed=0)
        for request_id, sample, token_id, finished in engine.stream():
            ...
        engine.outputs(rid)                                            # its 4 completions

Each ``step()`` is one forward over one flat sequence of tokens, no padding: the next token of every
running sample (decode) and chunks of the prompts being admitted (prefill), within a budget of
``max_batch_tokens`` tokens. Requests join at any step and leave as soon as they end (an EOS token
or ``max_new_tokens``), their blocks freed.

Scheduling (after vLLM v1's scheduler, from its description):
- running samples first, oldest request first, each taking its next token or prompt chunk;
- when the pool cannot grow a running sample, the newest running sample is preempted: its blocks are
  freed (its full blocks stay findable by hash) and it goes back to the queue, to be recomputed
  (prompt and tokens so far) when admitted again; a step that preempted admits nobody;
- waiting samples are admitted first come, first served while the budget and the free blocks allow
  (the head of the queue is never skipped); a prompt reuses the cached blocks of its longest cached
  prefix (``prefix_hits`` in ``stats()``) and is computed a chunk at a time.
Parallel sampling (``n > 1``): the prompt is computed once, then forked ``n`` ways sharing its
blocks; each completion copies the shared partial last block when it first writes to it.

Greedy is the argmax of the logits, as ``generate(do_sample=False)`` without logits processors;
sampling applies temperature, top-k and top-p as transformers does (``speculative.Sampler``).
"""
from __future__ import annotations

import bisect
import inspect
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch

from ..patches.settings import check_bool, check_int, is_int
from .paged_attention import PagedAttentionBinding, PagedBatch, kv_layout
from .paged_kv import BlockPool, KVCacheManager
from .speculative import Sampler

__all__ = ["ContinuousBatcher", "NewToken"]

Prompt = Union[Sequence[int], torch.Tensor, str]


class NewToken(NamedTuple):
    """A token produced by a step: which request and which of its ``n`` samples, and whether the
    sample ended with it."""

    request_id: int
    sample: int
    token_id: int
    finished: bool


class _Request:
    __slots__ = ("id", "prompt", "max_new_tokens", "n", "stops", "sampling", "seed", "samples")

    def __init__(self, request_id: int, prompt: List[int], max_new_tokens: int, n: int, stops: Set[int],
                 sampling: Optional[Sampler], seed: Optional[int]) -> None:
        self.id, self.prompt, self.max_new_tokens, self.n = request_id, prompt, max_new_tokens, n
        self.stops, self.sampling, self.seed = stops, sampling, seed
        self.samples: List["_Sample"] = []


class _Sample:
    """One completion: its tokens (prompt, then generated), and how many of them have K/V in the
    pool (``computed``; the manager holds exactly these between steps)."""

    __slots__ = ("request", "index", "tokens", "computed", "sampler", "finished")

    def __init__(self, request: _Request, index: int, tokens: List[int], computed: int) -> None:
        self.request, self.index, self.tokens, self.computed = request, index, tokens, computed
        self.finished = False
        self.sampler = None
        if request.sampling is not None:  # each sample its own stream, so preemption cannot reorder draws
            seed = None if request.seed is None else request.seed + index
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            self.sampler = Sampler(request.sampling.temperature, request.sampling.top_k, request.sampling.top_p,
                                   generator)
        request.samples.append(self)

    @property
    def key(self) -> Tuple[int, int]:
        """Its sequence id in the manager, and its age: a smaller key was added earlier."""
        return (self.request.id, self.index)

    @property
    def generated(self) -> List[int]:
        return self.tokens[len(self.request.prompt):]


class ContinuousBatcher:
    """Continuous batching of a transformers causal LM over a paged KV cache of ``num_blocks``
    blocks of ``block_size`` tokens (in the model's dtype, on its device), at most
    ``max_batch_tokens`` tokens per forward. The model is left as it is: its attention runs through
    the pool only inside ``step()``; ``close()`` (or leaving the ``with`` block) removes the
    attention registration and drops the pool."""

    def __init__(self, model: Any, tokenizer: Any = None, *, block_size: int = 16, num_blocks: int = 512,
                 max_batch_tokens: int = 512) -> None:
        block_size = check_int("ContinuousBatcher", "block_size", block_size, 1)
        num_blocks = check_int("ContinuousBatcher", "num_blocks", num_blocks, 1)
        self.max_batch_tokens = check_int("ContinuousBatcher", "max_batch_tokens", max_batch_tokens, 1)
        layers, kv_heads, head_dim = kv_layout(model, "ContinuousBatcher")
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.kv = KVCacheManager(BlockPool(num_blocks, block_size, layers, kv_heads, head_dim,
                                           dtype=model.dtype, device=model.device))
        self._binding = PagedAttentionBinding(model, self.kv.pool)
        self._takes_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self._default_stops = self._stop_ids(None)
        self._requests: Dict[int, _Request] = {}
        self._next_id = 0
        self._waiting: List[_Sample] = []   # ordered by key
        self._running: List[_Sample] = []   # ordered by key: the last is the newest
        self._broken = False
        self._counts = dict(steps=0, forward_calls=0, generated_tokens=0, computed_tokens=0, preemptions=0,
                            max_batch_sequences=0, max_step_tokens=0, peak_used_blocks=0, peak_tokens_held=0,
                            prefix_queries=0, prefix_hits=0)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Prompt, max_new_tokens: int, *, n: int = 1, do_sample: bool = False,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    seed: Optional[int] = None, eos_token_id: Union[int, Sequence[int], None] = None) -> int:
        """Queue a request; returns its id. ``prompt_ids``: token ids (a list, ``[n]`` or ``[1, n]``
        tensor) or a string when a tokenizer was given. ``n`` completions of the prompt share its
        blocks. ``do_sample`` with ``temperature``/``top_k``/``top_p`` samples (completion ``i`` draws
        from a generator seeded ``seed + i`` when ``seed`` is given); else greedy. Generation stops
        after ``max_new_tokens`` or an ``eos_token_id`` token (default: the model's generation
        config's, else the tokenizer's; ``[]`` for none). A request that could not fit the whole
        pool alone (prompt plus ``max_new_tokens - 1`` tokens of K/V) is refused."""
        self._check_open()
        owner = "ContinuousBatcher.add_request"
        prompt = self._prompt(prompt_ids)
        max_new_tokens = check_int(owner, "max_new_tokens", max_new_tokens, 1)
        n = check_int(owner, "n", n, 1)
        sampling = None
        if check_bool(owner, "do_sample", do_sample):
            sampling = Sampler(temperature, top_k, top_p)
        if seed is not None:
            check_int(owner, "seed", seed, 0)
        pool = self.kv.pool
        held = len(prompt) + max_new_tokens - 1
        if -(-held // pool.block_size) > pool.num_blocks:
            raise ValueError(f"{owner}: the request needs {-(-held // pool.block_size)} blocks of {pool.block_size} "
                             f"tokens (a prompt of {len(prompt)} and max_new_tokens={max_new_tokens}); the whole pool "
                             f"has {pool.num_blocks}: raise num_blocks or shorten the request")
        stops = self._default_stops if eos_token_id is None else self._stop_ids(eos_token_id)
        request = _Request(self._next_id, prompt, max_new_tokens, n, stops, sampling, seed)
        self._next_id += 1
        self._requests[request.id] = request
        self._waiting.append(_Sample(request, 0, list(prompt), 0))
        return request.id

    def outputs(self, request_id: int) -> List[List[int]]:
        """The tokens each of a request's ``n`` completions has generated so far (all ``n`` lists
        exist once its prompt is computed)."""
        return [list(s.generated) for s in sorted(self._request(request_id).samples, key=lambda s: s.index)]

    def release(self, request_id: int) -> List[List[int]]:
        """A finished request's completions, forgotten by the batcher (a long-running server calls
        this so that finished requests do not accumulate)."""
        if not self.is_finished(request_id):
            raise ValueError(f"ContinuousBatcher.release: request {request_id} has not finished")
        out = self.outputs(request_id)
        del self._requests[request_id]
        return out

    def is_finished(self, request_id: int) -> bool:
        request = self._request(request_id)
        return len(request.samples) == request.n and all(s.finished for s in request.samples)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- running -----------------------------------------------------------------------------------
    def step(self) -> List[NewToken]:
        """One forward over the running batch and the prompt chunks admitted now; returns the tokens
        it produced (none while every scheduled prompt is mid-chunk, or when there is no work)."""
        self._check_open()
        plan = self._schedule()
        if not plan:
            if self.has_unfinished():  # cannot happen: the oldest sample always fits the pool alone
                raise RuntimeError("ContinuousBatcher: no sample could be scheduled")
            return []
        batch, input_ids, keep = self._pack(plan)
        try:
            with torch.inference_mode(), self._binding.active(batch):
                out = self.model(input_ids=input_ids[None], position_ids=batch.positions[None], use_cache=False,
                                 **({"logits_to_keep": keep} if self._takes_keep else {}))
        except BaseException:
            self._broken = True  # blocks registered this step hold no K/V: nothing may read them again
            raise
        logits = out.logits[0] if self._takes_keep else out.logits[0, keep]
        counts = self._counts
        counts["steps"] += 1
        counts["forward_calls"] += 1
        counts["max_batch_sequences"] = max(counts["max_batch_sequences"], len(plan))
        counts["max_step_tokens"] = max(counts["max_step_tokens"], input_ids.shape[0])
        counts["computed_tokens"] += input_ids.shape[0]
        return self._advance(plan, logits)

    def stream(self) -> Iterator[NewToken]:
        """Steps until every request has finished, yielding each token as it is produced (requests
        added meanwhile are served too)."""
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, **options: Any) -> List[List[int]]:
        """Every prompt as a request (``options`` as ``add_request``'s, ``n`` = 1), stepped until all
        have finished; their generated tokens, in order."""
        if "n" in options:
            raise ValueError("ContinuousBatcher.generate: n is not taken here; use add_request(..., n=...) and "
                             "outputs()")
        ids = [self.add_request(p, max_new_tokens, **options) for p in prompts]
        while not all(self.is_finished(i) for i in ids):
            self.step()
        return [self.outputs(i)[0] for i in ids]

    def stats(self) -> Dict[str, Union[int, float]]:
        """The manager's ``memory_stats`` (KV memory now), and since the start: steps and forward
        calls, tokens generated and computed (prompts, recomputation after preemption, decode
        inputs), preemptions, the most sequences and tokens in one step, peak KV memory (blocks
        held, their bytes, and the tokens they held then), and the prefix cache's full prompt blocks looked up and found
        (counted per admission over the whole prompt, so a recomputed sample counts again)."""
        self._check_open()
        out: Dict[str, Union[int, float]] = dict(self.kv.memory_stats())
        out.update(self._counts)
        out["prefix_hit_rate"] = out["prefix_hits"] / out["prefix_queries"] if out["prefix_queries"] else 0.0
        out["peak_kv_bytes"] = out["peak_used_blocks"] * self.kv.pool.bytes_per_block
        return out

    def close(self) -> None:
        """Remove the attention registration and drop the pool (idempotent)."""
        if self.kv is not None:
            self._binding.close()
            self.kv = None

    def __enter__(self) -> "ContinuousBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- scheduling --------------------------------------------------------------------------------
    def _schedule(self) -> List[Tuple[_Sample, int, torch.Tensor]]:
        """This step's samples, each with its number of new tokens and their slots."""
        budget, plan, preempted = self.max_batch_tokens, [], False
        i = 0
        while i < len(self._running) and budget > 0:
            sample = self._running[i]
            count = min(len(sample.tokens) - sample.computed, budget)
            while not self.kv.can_append(sample.key, count) and self._running[-1] is not sample:
                self._preempt(self._running[-1])
                preempted = True
            if not self.kv.can_append(sample.key, count):
                self._preempt(sample)  # the newest itself: it waits for memory
                preempted = True
                break
            plan.append((sample, count, self.kv.append_slots(sample.key, sample.tokens[sample.computed:][:count])))
            budget -= count
            i += 1
        while self._waiting and budget > 0 and not preempted:
            sample = self._waiting[0]
            cached = self.kv.cached_prefix_length(sample.tokens)
            head = sample.tokens[:cached + min(len(sample.tokens) - cached, budget)]
            if not self.kv.can_allocate(head):
                break
            sample.computed = self.kv.allocate(sample.key, head)
            self._counts["prefix_queries"] += (len(sample.tokens) - 1) // self.kv.pool.block_size
            self._counts["prefix_hits"] += sample.computed // self.kv.pool.block_size
            plan.append((sample, len(head) - sample.computed, self.kv.slot_mapping(sample.key, sample.computed)))
            budget -= len(head) - sample.computed
            self._waiting.pop(0)
            bisect.insort(self._running, sample, key=lambda s: s.key)
        if self.kv.pool.used_blocks >= self._counts["peak_used_blocks"]:  # and the tokens those blocks held
            self._counts["peak_used_blocks"] = self.kv.pool.used_blocks
            self._counts["peak_tokens_held"] = self.kv.tokens_held
        return plan

    def _preempt(self, sample: _Sample) -> None:
        self.kv.free(sample.key)
        sample.computed = 0
        self._running.remove(sample)
        bisect.insort(self._waiting, sample, key=lambda s: s.key)
        self._counts["preemptions"] += 1

    def _pack(self, plan: List[Tuple[_Sample, int, torch.Tensor]]) -> Tuple[PagedBatch, torch.Tensor, torch.Tensor]:
        """The flat input ids ``[T]``, the batch's metadata, and the indices of the tokens whose logits
        are needed (each sample's last token, when it completes the sample's tokens)."""
        device = self.kv.pool.key_cache.device
        ids, keep, total = [], [], 0
        for sample, count, _ in plan:
            ids += sample.tokens[sample.computed:sample.computed + count]
            total += count
            if sample.computed + count == len(sample.tokens):
                keep.append(total - 1)
        keys = [sample.key for sample, _, _ in plan]
        batch = PagedBatch.build(torch.cat([slots for _, _, slots in plan]), self.kv.block_tables(keys),
                                 [s.computed + count for s, count, _ in plan], [count for _, count, _ in plan],
                                 self.kv.pool.block_size)
        return (batch, torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(keep, dtype=torch.long, device=device))

    def _advance(self, plan: List[Tuple[_Sample, int, torch.Tensor]], logits: torch.Tensor) -> List[NewToken]:
        """Record what the step computed, draw each finishing sample's next token, fork requests whose
        prompt was just computed, and retire samples that ended."""
        producing = []
        for sample, count, _ in plan:
            sample.computed += count
            if sample.computed == len(sample.tokens):
                producing.append(sample)
        new: List[NewToken] = []
        for sample, row in zip(producing, logits):
            request = sample.request
            group = [sample]
            while len(request.samples) < request.n:  # the prompt is computed: fork the other completions
                child = _Sample(request, len(request.samples), list(sample.tokens), sample.computed)
                self.kv.fork(sample.key, child.key)
                bisect.insort(self._running, child, key=lambda s: s.key)
                group.append(child)
            for member in group:
                token = self._choose(member, row)
                member.tokens.append(token)
                member.finished = token in request.stops or len(member.generated) == request.max_new_tokens
                if member.finished:
                    self.kv.free(member.key)
                    self._running.remove(member)
                new.append(NewToken(request.id, member.index, token, member.finished))
        self._counts["generated_tokens"] += len(new)
        return new

    @staticmethod
    def _choose(sample: _Sample, logits: torch.Tensor) -> int:
        if sample.sampler is None:
            return int(logits.argmax())
        return sample.sampler.draw(sample.sampler.probs(logits[None])[0])

    # -- checks ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.kv is None:
            raise RuntimeError("ContinuousBatcher: closed")
        if self._broken:
            raise RuntimeError("ContinuousBatcher: a step failed part way, so the pool may hold blocks without their "
                               "K/V; close this batcher and start a new one")

    def _request(self, request_id: int) -> _Request:
        request = self._requests.get(request_id) if is_int(request_id) else None
        if request is None:
            raise ValueError(f"ContinuousBatcher: request_id must be an id add_request returned; got {request_id!r}")
        return request

    def _prompt(self, prompt_ids: Prompt) -> List[int]:
        owner = "ContinuousBatcher.add_request"
        if isinstance(prompt_ids, str):
            if self.tokenizer is None:
                raise TypeError(f"{owner}: prompt_ids is a string but the batcher has no tokenizer; pass token ids")
            prompt_ids = self.tokenizer.encode(prompt_ids)
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            if prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.is_complex():
                raise TypeError(f"{owner}: prompt_ids must be token ids ([n] or [1, n] integer tensor, or a list); "
                                f"got a {list(prompt_ids.shape)} {prompt_ids.dtype} tensor")
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, Sequence):
            raise TypeError(f"{owner}: prompt_ids must be a list of token ids or a tensor; "
                            f"got {type(prompt_ids).__name__}")
        bad = next((t for t in prompt_ids if not (is_int(t) and 0 <= t < self.vocab_size)), None)
        if bad is not None or not prompt_ids:
            raise ValueError(f"{owner}: prompt_ids must hold at least one token id in 0..{self.vocab_size - 1}; "
                             f"got {'an empty prompt' if bad is None else repr(bad)}")
        return [int(t) for t in prompt_ids]

    def _stop_ids(self, eos_token_id: Union[int, Sequence[int], None]) -> Set[int]:
        if eos_token_id is None:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is not None:
                eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            return set()
        ids = [eos_token_id] if is_int(eos_token_id) else eos_token_id
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, Sequence) or not all(is_int(t) for t in ids):
            raise TypeError(f"ContinuousBatcher: eos_token_id must be an int, a list of ints or None; "
                            f"got {eos_token_id!r}")
        return {int(t) for t in ids}
