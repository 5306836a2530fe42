"""Continuous batching on the built-in language model (SmolLM2-135M-Instruct, float32): many requests
of mixed lengths, served by accel's ``ContinuousBatcher`` (paged KV cache) against transformers'
``generate`` with padding and against transformers' own continuous batching.

Workload (seeded): ``--requests`` prompts of ``--prompt-len`` tokens (uniform in the range), each
with its own ``max_new_tokens`` (``--new-tokens``), cut from the docstrings of standard-library
modules at random offsets (real text, raw continuation); ``--shared-prefix`` puts the same first
tokens (a system prompt) in front of every prompt, for the prefix cache to find.

Variants, all greedy:
- generate, one request at a time: the reference every row's outputs are compared with;
- generate, one padded batch: every request left-padded into one batch, run to the batch's largest
  ``max_new_tokens``, each row then cut to its own (and after its EOS);
- generate, length-sorted batches of 8: the same, requests sorted by prompt + max_new_tokens;
- transformers continuous batching: ``generate_batch``'s manager (``continuous_batching_context_manager``,
  one ``add_request`` per request, since ``generate_batch`` takes one ``max_new_tokens`` for all),
  with the engine's token capacity and ``max_batch_tokens``;
- accel ContinuousBatcher.
Reported: generated tokens/s, KV memory (peak held for the engine; the padded cache for generate;
what transformers' manager preallocates), tokens computed per real token (padding, recomputation),
requests whose tokens equal the reference, and the engine's KV slots (blocks x block size) per
token its sequences held at its peak (a token of a shared prefix counted once per sequence).

    python scripts/bench_batching.py                  # 64 requests, 16-512 prompt tokens, 16-256 new
    python scripts/bench_batching.py --quick --out r.json
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.eval.report import format_table, machine_description  # noqa: E402
from accel.eval.timing import time_interleaved  # noqa: E402
from accel.llm.batching import ContinuousBatcher  # noqa: E402

MODULES = ("json", "csv", "textwrap", "difflib", "heapq", "fractions", "argparse", "logging", "collections",
           "functools", "itertools", "pathlib", "re", "string", "typing", "unittest", "zipfile", "tarfile",
           "sqlite3", "decimal", "datetime", "statistics", "random", "shutil", "subprocess", "threading")

Request = Tuple[List[int], int]   # prompt ids, max_new_tokens


def workload(tokenizer: Any, count: int, prompt_len: Tuple[int, int], new_tokens: Tuple[int, int],
             shared_prefix: int, seed: int) -> List[Request]:
    """``count`` (prompt, max_new_tokens) pairs cut from standard-library docstrings."""
    text = "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in MODULES)
    corpus = tokenizer.encode(text)
    rng = random.Random(seed)
    prefix = corpus[:shared_prefix]
    out = []
    for _ in range(count):
        length = rng.randint(*prompt_len)
        body = length - len(prefix)
        start = rng.randrange(len(prefix), len(corpus) - body)
        out.append((prefix + corpus[start:start + body], rng.randint(*new_tokens)))
    return out


def cut(tokens: List[int], limit: int, eos: int) -> List[int]:
    """A padded row's new tokens as the request alone would end: at most ``limit``, through its EOS."""
    tokens = tokens[:limit]
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def padded_generate(model: Any, requests: List[Request], pad: int, eos: int) -> Tuple[List[List[int]], int]:
    """One left-padded ``generate`` call; the rows' new tokens, and the tokens the cache held."""
    width = max(len(p) for p, _ in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(requests):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    new = max(k for _, k in requests)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=pad,
                         eos_token_id=eos)
    rows = [cut(out[row, width:].tolist(), k, eos) for row, (_, k) in enumerate(requests)]
    return rows, len(requests) * out.shape[1]


def variants(args: argparse.Namespace, model: Any, tokenizer: Any, pad: int, eos: int,
             record: Dict[str, Dict[str, Any]]) -> Dict[str, Callable[[List[Request]], List[List[int]]]]:
    """Each variant serves a list of requests and returns their new tokens; what it measured besides
    (KV tokens held, tokens computed, the engine's stats) goes into ``record[variant]``."""

    def alone(requests):
        outs = [padded_generate(model, [r], pad, eos)[0][0] for r in requests]
        held = [len(p) + len(o) for (p, _), o in zip(requests, outs)]
        record["generate, one request at a time"].update(kv_tokens=max(held), computed=sum(held))
        return outs

    def batches(size, label):
        def run(requests):
            order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]) + requests[i][1])
            outs: List[List[int]] = [[] for _ in requests]
            peak = computed = 0
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                rows, held = padded_generate(model, [requests[i] for i in chunk], pad, eos)
                for i, row in zip(chunk, rows):
                    outs[i] = row
                peak, computed = max(peak, held), computed + held
            record[label].update(kv_tokens=peak, computed=computed)
            return outs
        return run

    def transformers_cb(requests):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        capacity = args.num_blocks * args.block_size
        page = 256
        config = ContinuousBatchingConfig(num_blocks=-(-capacity // page), page_size=page,
                                          max_batch_tokens=args.max_batch_tokens)
        generation = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                      max_new_tokens=max(k for _, k in requests))
        results = {}
        with model.continuous_batching_context_manager(generation_config=generation, block=True, timeout=5,
                                                       continuous_batching_config=config) as manager:
            for i, (prompt, k) in enumerate(requests):
                manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=k, eos_token_id=eos)
            while len(results) < len(requests):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                elif result is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before every request finished")
        record["transformers continuous batching"].update(kv_tokens=-(-capacity // page) * page, kv_allocated=True)
        return [list(results[f"r{i}"].generated_tokens) for i in range(len(requests))]

    def accel(requests):
        with ContinuousBatcher(model, tokenizer, block_size=args.block_size, num_blocks=args.num_blocks,
                               max_batch_tokens=args.max_batch_tokens) as engine:
            ids = [engine.add_request(p, k, eos_token_id=eos) for p, k in requests]
            for _ in engine.stream():
                pass
            outs = [engine.outputs(i)[0] for i in ids]
            stats = engine.stats()
        record["accel ContinuousBatcher"].update(kv_tokens=stats["peak_used_blocks"] * args.block_size,
                                                 computed=stats["computed_tokens"], stats=stats)
        return outs

    table = {"generate, one request at a time": alone,
             "generate, one padded batch": batches(args.requests, "generate, one padded batch"),
             f"generate, batches of {args.batch}": batches(args.batch, f"generate, batches of {args.batch}"),
             "transformers continuous batching": transformers_cb, "accel ContinuousBatcher": accel}
    keys = ["alone", "padded", "sorted", "transformers", "accel"]
    table = {name: run for (name, run), key in zip(table.items(), keys) if key == "alone" or key in args.variants}
    for name in table:
        record[name] = {}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    parser.add_argument("--batch", type=int, default=8, help="size of the length-sorted padded batches")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=2048, help="the engine's pool (KV capacity / block size)")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 short requests, a few tokens: a smoke run")
    parser.add_argument("--variants", nargs="+", default=["padded", "sorted", "transformers", "accel"],
                        choices=("padded", "sorted", "transformers", "accel"),
                        help="what to run besides generate one request at a time (the reference)")
    parser.add_argument("--out", type=Path, default=None, help="JSON record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.requests, args.prompt_len, args.new_tokens, args.shared_prefix = 4, (12, 28), (3, 8), 8
        args.batch, args.block_size, args.num_blocks, args.max_batch_tokens, args.repeats = 2, 4, 64, 32, 1
    import accel.pipelines as pipelines

    model, tokenizer = pipelines.load("smollm2-135m")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    requests = workload(tokenizer, args.requests, tuple(args.prompt_len), tuple(args.new_tokens), args.shared_prefix,
                        args.seed)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    name = "SmolLM2-135M-Instruct (dequantised Q4_1, float32)"
    record: Dict[str, Any] = {"machine": machine_description("transformers"), "model": name,
                              "command": " ".join(["python scripts/bench_batching.py"] + sys.argv[1:]),
                              "load average": os.getloadavg()[0],
                              "workload": {"requests": args.requests, "prompt tokens": sum(len(p) for p, _ in requests),
                                           "max_new_tokens": sum(k for _, k in requests),
                                           "prompt_len": list(args.prompt_len), "new_tokens": list(args.new_tokens),
                                           "shared_prefix": args.shared_prefix, "seed": args.seed},
                              "engine": {"block_size": args.block_size, "num_blocks": args.num_blocks,
                                         "max_batch_tokens": args.max_batch_tokens}, "rows": []}
    print(f"{record['machine']}; {name}; {args.requests} requests; load average {record['load average']:.2f}",
          flush=True)
    measured: Dict[str, Dict[str, Any]] = {}
    table = variants(args, model, tokenizer, pad, eos, measured)
    outputs: Dict[str, List[List[int]]] = {}

    def run(variant: str) -> None:
        outputs[variant] = table[variant](requests)

    with torch.inference_mode():
        for variant in table if not args.quick else ():  # warm-up on two small requests
            table[variant]([(p[:8], 2) for p, _ in requests[:2]])
        timings = time_interleaved({v: (lambda v=v: run(v)) for v in table}, repeats=args.repeats, warmup=0)
    reference = outputs["generate, one request at a time"]
    base = timings["generate, one request at a time"].median_s
    for variant in table:
        got, seen = outputs[variant], measured[variant]
        real = sum(len(p) + len(o) for (p, _), o in zip(requests, got))
        generated = sum(map(len, got))
        row = {"variant": variant, "generated": generated, "tokens/s": generated / timings[variant].median_s,
               "speedup": base / timings[variant].median_s,
               "KV MiB": seen["kv_tokens"] * per_token / 2 ** 20,
               "KV": "preallocated" if seen.get("kv_allocated") else "peak held",
               "computed/real": seen["computed"] / real if "computed" in seen else None,
               "equal to greedy": f"{sum(a == b for a, b in zip(got, reference))}/{len(requests)}"}
        stats = seen.get("stats")
        if stats:
            row.update(forward_calls=stats["forward_calls"], preemptions=stats["preemptions"],
                       prefix_hits=stats["prefix_hits"], max_batch=stats["max_batch_sequences"],
                       kv_over_held=stats["peak_used_blocks"] * args.block_size / stats["peak_tokens_held"])
        record["rows"].append(row)
    def padded(size: int) -> int:  # tokens a padded cache holds, batches of ``size`` sorted by length
        order = sorted(requests, key=lambda r: len(r[0]) + r[1])
        return sum(len(chunk) * max(len(p) + k for p, k in chunk)
                   for chunk in (order[s:s + size] for s in range(0, len(order), size)))

    requested = sum(len(p) + k for p, k in requests)
    record["workload"]["padded/real tokens, one batch"] = padded(len(requests)) / requested
    record["workload"][f"padded/real tokens, sorted batches of {args.batch}"] = padded(args.batch) / requested
    record["load average after"] = os.getloadavg()[0]
    print(format_table(record["rows"], [
        ("variant", "variant", ""), ("tokens/s", "tokens/s", ".1f"), ("speedup", "speedup", ".2f"),
        ("KV MiB", "KV MiB", ".1f"), ("KV", "KV", ""), ("computed/real", "computed/real", ".2f"),
        ("equal to greedy", "equal to greedy", ""), ("forward_calls", "forwards", ""),
        ("preemptions", "preemptions", ""), ("prefix_hits", "prefix hits", ""), ("max_batch", "max batch", ""),
        ("kv_over_held", "KV slots / tokens held at peak", ".3f")]),
        flush=True)
    w = record["workload"]
    print(f"workload: {w['prompt tokens']} prompt tokens, {w['max_new_tokens']} max new tokens; padded/real "
          f"(prompt + max_new_tokens): {w['padded/real tokens, one batch']:.2f} in one batch, "
          f"{w[f'padded/real tokens, sorted batches of {args.batch}']:.2f} in sorted batches of {args.batch}")
    print(f"load average {record['load average']:.2f} before, {record['load average after']:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
