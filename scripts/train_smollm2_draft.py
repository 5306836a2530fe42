"""Train the shipped draft model for SmolLM2-135M-Instruct (``accel.pipelines.load("smollm2-draft")``).

Real text: the Python 3.11 documentation's reST sources from Debian's ``python3.11-doc`` (PSF licence),
fetched without installing anything::

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/train_smollm2_draft.py all --docs /tmp/pydoc/usr/share/doc/python3.11/html/_sources

Every tenth file (by a hash of its path) is held out: no training step sees it, and every
acceptance figure is measured on requests built from held-out files only.

Stages (each resumable; ``all`` runs them in order, the work folder keeps what is done):
- ``corpus``: split the files, tokenise the held-in text with SmolLM2's tokenizer, choose the draft's
  vocabulary (the most frequent ids plus every special token), and build chat requests about
  passages (explain, summarise, or ask-and-answer) for held-in and held-out files.
- ``distil``: the target answers held-in requests greedily, in left-padded batches; its answers
  are the draft's labels (sequence-level distillation: the draft learns to predict exactly what
  the target will say, which is what greedy speculative decoding accepts). Written in shards, so
  a cut-off run keeps what it generated.
- ``train``: the draft, a small Llama with a trimmed vocabulary, learns from a mix of the
  documentation itself (plain next-token prediction) and the target's answers (loss on the answer
  tokens). Seeded, checkpointed, resumable.
- ``eval``: how often the draft's greedy token equals the target's, on the target's greedy answers to
  held-out requests (teacher-forced: the per-token acceptance of greedy speculation).
- ``export``: the float16 weights, config and vocabulary into ``assets/smollm2-draft/``, with held-out
  requests for the benchmark.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.pipelines.smollm2_draft import ASSET_DIR, SmolLM2Draft, draft_config, save_draft  # noqa: E402
from accel.pipelines.training import load_state, save_state, warm_cosine  # noqa: E402

TEMPLATES = ("Explain what this passage from the Python documentation says, in plain words:\n\n{}",
             "Summarise the following text:\n\n{}",
             "Write one question about this text, then answer it:\n\n{}")


def held_out(relative: str) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 10 == 0


def passages(text: str, words: int = 80) -> List[str]:
    """Prose paragraphs (not directives, code or tables) of at least 25 words, cut at ``words``."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or lines[0].startswith(("..", ">>>", "+", "|", "=", "-", "*")) or block.startswith(" "):
            continue
        flat = " ".join(lines).split()
        if len(flat) >= 25:
            out.append(" ".join(flat[:words]))
    return out


def chat_ids(tokenizer: Any, content: str) -> List[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def stage_corpus(args: argparse.Namespace, work: Path) -> None:
    if (work / "corpus.pt").is_file():
        return
    from transformers import AutoTokenizer
    from accel.pipelines.smollm2 import cache_dir, load_smollm2

    load_smollm2()  # converts the target once, which also writes its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(cache_dir())
    files = sorted(Path(args.docs).rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"--docs: no *.rst.txt under {args.docs}")
    rng = random.Random(0)
    train_ids: List[int] = []
    requests: Dict[str, List[List[int]]] = {"train": [], "heldout": []}
    heldout_text: List[Dict[str, str]] = []
    for path in files:
        relative = str(path.relative_to(args.docs))
        text = path.read_text(encoding="utf-8", errors="replace")
        split = "heldout" if held_out(relative) else "train"
        if split == "train":
            train_ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        for passage in passages(text):
            template = rng.randrange(len(TEMPLATES))
            requests[split].append(chat_ids(tokenizer, TEMPLATES[template].format(passage)))
            if split == "heldout":
                heldout_text.append({"file": relative, "template": template, "passage": passage})
    counts = torch.bincount(torch.tensor(train_ids), minlength=len(tokenizer))
    special = set(tokenizer.all_special_ids) | set(requests["train"][0][:12])
    top = counts.argsort(descending=True, stable=True)[:args.vocab].tolist()
    kept = sorted(set(top[:args.vocab - len(special - set(top))]) | special)
    torch.save({"train_ids": torch.tensor(train_ids, dtype=torch.int32), "requests": requests,
                "heldout_text": heldout_text, "kept_ids": kept}, work / "corpus.pt")
    covered = counts[kept].sum().item() / counts.sum().item()
    print(f"corpus: {len(files)} files, {len(train_ids)} held-in tokens, {len(requests['train'])} held-in and "
          f"{len(requests['heldout'])} held-out requests; {len(kept)} kept ids cover {covered:.1%} of held-in tokens")


def stage_distil(args: argparse.Namespace, work: Path) -> None:
    from accel.pipelines.smollm2 import load_smollm2

    corpus = torch.load(work / "corpus.pt")
    requests = corpus["requests"]["train"]
    order = list(range(len(requests)))
    random.Random(1).shuffle(order)
    model, tokenizer = load_smollm2()
    shards = work / "distil"
    shards.mkdir(exist_ok=True)
    per_shard = args.distil_batch * 4
    total = min(len(order), args.distil_requests)
    for start in range(0, total, per_shard):
        out = shards / f"{start:06d}.pt"
        if out.is_file():
            continue
        began = time.perf_counter()
        rows = []
        for at in range(start, min(start + per_shard, total), args.distil_batch):
            batch = [requests[i] for i in order[at:at + args.distil_batch]]
            width = max(map(len, batch))
            ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in batch])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                           max_new_tokens=args.answer_tokens, pad_token_id=tokenizer.eos_token_id)
            for row, request in zip(generated[:, width:].tolist(), batch):
                answer = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                rows.append((request, answer))
        torch.save(rows, out)
        tokens = sum(len(a) for _, a in rows)
        print(f"distil {start}/{total}: {tokens} answer tokens in {time.perf_counter() - began:.0f}s", flush=True)


def distilled(work: Path) -> List[Any]:
    rows: List[Any] = []
    for shard in sorted((work / "distil").glob("*.pt")):
        rows.extend(torch.load(shard))
    return rows


def model_config(args: argparse.Namespace, kept: List[int]) -> Any:
    """The draft's config from the command line's shape settings."""
    return draft_config(kept, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                        intermediate=args.intermediate, context=args.context)


def stage_train(args: argparse.Namespace, work: Path) -> None:
    corpus = torch.load(work / "corpus.pt")
    kept = corpus["kept_ids"]
    torch.manual_seed(0)
    model = SmolLM2Draft(model_config(args, kept))
    if args.init_embeddings:
        init_from_target(model, kept)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_path = work / "train_state.pt"
    step = load_state(state_path, model, optimizer, "model")
    to_draft = model.full_to_draft
    text = corpus["train_ids"].long()
    rng = torch.Generator().manual_seed(step)
    began, losses = time.perf_counter(), []
    model.train()
    rows = distilled(work)
    while step < args.steps:
        if step % 200 == 0:
            rows = distilled(work)  # picks up new shards as they land
        lr = warm_cosine(args.lr, step, 100, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, labels = batch(text, rows, args, rng)
        logits = model.draft_logits(to_draft[ids])
        target = torch.where(labels >= 0, to_draft[labels.clamp(min=0)], torch.full_like(labels, -100))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            rate = 50 * args.batch * args.context / (time.perf_counter() - began)
            print(f"step {step}: loss {sum(losses) / len(losses):.3f}, lr {lr:.2e}, {rate:.0f} tokens/s, "
                  f"{len(rows)} distilled answers", flush=True)
            began, losses = time.perf_counter(), []
        if step % args.save_every == 0 or step == args.steps:
            save_state(state_path, model, optimizer, step, "model")


def batch(text: torch.Tensor, rows: List[Any], args: argparse.Namespace, rng: torch.Generator):
    """``args.batch`` sequences of ``args.context`` tokens: a fraction ``args.distil_fraction`` are a
    request and the target's answer (loss on the answer only), the rest windows of the documentation."""
    ids = torch.full((args.batch, args.context + 1), 2, dtype=torch.long)
    labels = torch.full((args.batch, args.context), -1, dtype=torch.long)
    for b in range(args.batch):
        if rows and torch.rand((), generator=rng).item() < args.distil_fraction:
            request, answer = rows[torch.randint(len(rows), (), generator=rng).item()]
            seq = (request + answer)[-(args.context + 1):]
            first = len(seq) - len(answer)  # index of the first answer token in seq
            ids[b, :len(seq)] = torch.tensor(seq)
            target = ids[b, 1:].clone()
            target[:max(first - 1, 0)] = -1
            target[len(seq) - 1:] = -1
            labels[b] = target
        else:
            at = torch.randint(len(text) - args.context - 1, (), generator=rng).item()
            ids[b] = text[at:at + args.context + 1]
            labels[b] = ids[b, 1:]
    return ids[:, :-1], labels


def init_from_target(model: SmolLM2Draft, kept: List[int]) -> None:
    """The draft's embeddings start as the target's, for the kept ids, projected onto their top
    principal directions (the target is 576 wide, the draft narrower)."""
    from accel.pipelines.smollm2 import load_smollm2

    target, _ = load_smollm2()
    table = target.get_input_embeddings().weight.detach()[kept]
    centred = table - table.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:model.config.hidden_size].T
    projected *= model.model.embed_tokens.weight[:len(kept)].std() / projected.std()
    with torch.no_grad():
        model.model.embed_tokens.weight[:len(kept)] = projected


def stage_eval(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Teacher-forced agreement on held-out requests: how often the draft's greedy token equals the
    target's answer token, given the answer so far (per-token acceptance of greedy speculation)."""
    from accel.pipelines.smollm2 import load_smollm2

    corpus = torch.load(work / "corpus.pt")
    answers_path = work / "heldout_answers.pt"
    if not answers_path.is_file():
        target, tokenizer = load_smollm2()
        rows = []
        order = list(range(len(corpus["requests"]["heldout"])))
        random.Random(2).shuffle(order)  # the export's order: requests from all over the documentation
        for request in [corpus["requests"]["heldout"][i] for i in order[:args.eval_requests]]:
            with torch.no_grad():
                out = target.generate(torch.tensor([request]), do_sample=False, max_new_tokens=args.answer_tokens,
                                      pad_token_id=tokenizer.eos_token_id)
            rows.append((request, out[0, len(request):].tolist()))
        torch.save(rows, answers_path)
    rows = torch.load(answers_path)
    state = torch.load(work / "train_state.pt")
    model = SmolLM2Draft(model_config(args, corpus["kept_ids"]))
    model.load_state_dict(state["model"])
    model.eval()
    agree = total = 0
    runs = []  # lengths of agreeing runs, for the tokens a pass would yield
    with torch.no_grad():
        for request, answer in rows:
            logits = model(input_ids=torch.tensor([request + answer])).logits[0, len(request) - 1:-1]
            hits = (logits.argmax(-1) == torch.tensor(answer)).tolist()
            agree, total = agree + sum(hits), total + len(hits)
            runs.append(hits)
    alpha = agree / total
    print(f"step {state['step']}: draft agrees with the target's greedy answer on {alpha:.3f} of {total} held-out "
          f"tokens; with k=4 a pass would yield about {(1 - alpha ** 5) / (1 - alpha):.2f} tokens")
    return {"heldout_requests": len(rows), "heldout_answer_tokens": total, "heldout_greedy_agreement": round(alpha, 4)}


def stage_export(args: argparse.Namespace, work: Path) -> None:
    corpus = torch.load(work / "corpus.pt")
    state = torch.load(work / "train_state.pt")
    model = SmolLM2Draft(model_config(args, corpus["kept_ids"]))
    model.load_state_dict(state["model"])
    out = Path(args.out)
    answers = distilled(work)
    settings = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate",
                                              "context", "batch", "steps", "lr", "distil_fraction", "answer_tokens")}
    save_draft(model, out, {"command": "python scripts/train_smollm2_draft.py all (see its docstring)",
                            "settings": settings, "trained_steps": state["step"],
                            "tokens_per_step": args.batch * args.context,
                            "held_in_text_tokens": len(corpus["train_ids"]),
                            "held_in_requests": len(corpus["requests"]["train"]),
                            "distilled_answers": len(answers),
                            "distilled_answer_tokens": sum(len(a) for _, a in answers),
                            **stage_eval(args, work)})
    rng = random.Random(2)
    heldout = list(corpus["heldout_text"])
    rng.shuffle(heldout)
    (out / "heldout_requests.json").write_text(json.dumps(
        {"source": "Debian python3.11-doc reST sources (PSF licence), files held out of training",
         "templates": TEMPLATES, "requests": heldout[:64]}, indent=1) + "\n")
    print(f"exported to {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("corpus", "distil", "train", "eval", "export", "all"))
    parser.add_argument("--docs", default="/usr/share/doc/python3.11/html/_sources")
    parser.add_argument("--work", default="/tmp/accel-smollm2-draft")
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--distil-requests", type=int, default=4096)
    parser.add_argument("--distil-batch", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--distil-fraction", type=float, default=0.5)
    parser.add_argument("--init-embeddings", action="store_true")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--eval-requests", type=int, default=24)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = ("corpus", "distil", "train", "eval", "export") if args.stage == "all" else (args.stage,)
    for stage in stages:
        globals()[f"stage_{stage}"](args, work)


if __name__ == "__main__":
    main()
