"""Train the shipped EAGLE draft head for SmolLM2-135M-Instruct (``accel.pipelines.load("smollm2-eagle")``).

It reuses the draft model's work folder (``scripts/train_smollm2_draft.py corpus`` and ``distil``):
the Python 3.11 documentation from Debian's ``python3.11-doc`` (PSF licence), every tenth file held
out, and the target's own greedy answers to chat requests about held-in passages.

Stages (each resumable; ``all`` runs them in order):
- ``features``: the target reads each training sequence (a held-in request with its greedy answer,
  or a window of held-in documentation) once; its final hidden states (the features its output
  layer reads) are kept in float16 with the token ids.
- ``train``: the head learns, from ``(f_t, x_{t+1})``, to predict ``f_{t+1}`` (smooth L1) and the
  target's next-token distribution over the kept ids (cross-entropy against the target's own
  softmax, weight 0.1), with uniform noise on its input features so that it tolerates its own
  errors when drafting several tokens (EAGLE's recipe). Seeded, checkpointed, resumable.
- ``eval``: on the target's greedy answers to held-out requests: how often the head's first guess
  is the target's token, and how many tokens a pass of ``k`` = 4 chained guesses would yield.
- ``export``: float16 weights, config and record into ``assets/smollm2-eagle/``.

    python scripts/train_smollm2_draft.py corpus --docs /tmp/pydoc/usr/share/doc/python3.11/html/_sources
    python scripts/train_smollm2_draft.py distil
    python scripts/train_smollm2_eagle.py all
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.llm.eagle import EagleHead, save_eagle_head  # noqa: E402
from accel.pipelines.training import load_state, save_state, warm_cosine  # noqa: E402

ASSET = ROOT / "assets" / "smollm2-eagle"


def load_target() -> Any:
    from accel.pipelines.smollm2 import load_smollm2

    return load_smollm2()[0]


@torch.no_grad()
def target_features(target: Any, sequences: List[List[int]]) -> List[torch.Tensor]:
    """Each sequence's final hidden states (after the final norm), float16 ``[T, H]``; sequences are
    run right-padded in batches of similar length (right padding leaves earlier positions exact)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: List[Any] = [None] * len(sequences)
    for at in range(0, len(order), 8):
        chunk = order[at:at + 8]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, :len(sequences[i])] = 1
        hidden = target.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, i in enumerate(chunk):
            out[i] = hidden[row, :len(sequences[i])].to(torch.float16)
    return out


def stage_features(args: argparse.Namespace, work: Path) -> None:
    if (work / "features.pt").is_file():
        return
    draft_work = Path(args.draft_work)
    corpus = torch.load(draft_work / "corpus.pt")
    rows = []
    for shard in sorted((draft_work / "distil").glob("*.pt")):
        rows.extend(torch.load(shard))
    sequences = [(request + answer)[:args.context + 1] for request, answer in rows]
    text = corpus["train_ids"]
    rng = random.Random(3)
    for _ in range(args.doc_windows):
        at = rng.randrange(len(text) - args.context - 1)
        sequences.append(text[at:at + args.context + 1].tolist())
    target = load_target()
    began = time.perf_counter()
    features = []
    for at in range(0, len(sequences), 256):
        features += target_features(target, sequences[at:at + 256])
        print(f"features: {at + 256}/{len(sequences)} sequences, {time.perf_counter() - began:.0f}s", flush=True)
    torch.save({"ids": [torch.tensor(s, dtype=torch.int32) for s in sequences], "features": features,
                "distilled": len(rows), "kept_ids": corpus["kept_ids"]}, work / "features.pt")


def make_head(target: Any, kept: List[int], args: argparse.Namespace) -> EagleHead:
    torch.manual_seed(0)
    return EagleHead.for_target(target, kept, intermediate=args.intermediate)


def losses(head: EagleHead, embed: torch.nn.Module, out_weight: torch.Tensor, ids: torch.Tensor,
           features: torch.Tensor, valid: torch.Tensor, noise: float, unroll: int = 1
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smooth-L1 on the predicted features and cross-entropy against the target's next-token
    distribution over the kept ids, over the valid pairs of ``ids, features: [B, T(, H)]``.

    ``unroll`` = 2 adds the second drafting step as it runs when drafting (after EAGLE-3's
    training-time test): at position ``i`` the head reads its own predicted ``f_i`` with ``x_{i+1}``,
    attending to the true pairs before ``i`` and to itself, and is scored on ``f_{i+1}`` likewise."""
    inputs = features[:, :-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    with torch.no_grad():
        tokens = embed(ids[:, 1:])
        wanted = F.softmax(features[:, 1:] @ out_weight.T, dim=-1)
    length = ids.shape[1] - 1
    positions = torch.arange(length)[None].expand(ids.shape[0], -1)
    predicted, past = head(inputs, tokens, positions)
    pairs = valid[:, 1:]
    regression = F.smooth_l1_loss(predicted, features[:, 1:], reduction="none").mean(-1)[pairs].mean()
    cross = -(wanted * F.log_softmax(predicted @ out_weight.T, dim=-1)).sum(-1)[pairs].mean()
    if unroll == 2:
        # query i: the true pairs' keys before i, then its own (the second T of the keys)
        before = torch.ones(length, length, dtype=torch.bool).tril(-1)
        attend = torch.cat([before, torch.eye(length, dtype=torch.bool)], dim=1)[None].expand(ids.shape[0], -1, -1)
        own = torch.cat([inputs[:, :1], predicted[:, :-1]], dim=1)  # f^_i from the first step (f_0 is true)
        second, _ = head(own, tokens, positions, past, attend=attend)
        later = pairs.clone()
        later[:, 0] = False  # position 0 read a true feature: the first step already scores it
        regression = regression + F.smooth_l1_loss(second, features[:, 1:], reduction="none").mean(-1)[later].mean()
        cross = cross - (wanted * F.log_softmax(second @ out_weight.T, dim=-1)).sum(-1)[later].mean()
    return regression, cross


def stage_train(args: argparse.Namespace, work: Path) -> None:
    data = torch.load(work / "features.pt")
    target = load_target()
    kept = data["kept_ids"]
    embed = target.get_input_embeddings()
    out_weight = target.get_output_embeddings().weight.detach()[torch.tensor(kept)]
    head = make_head(target, kept, args)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state_path = work / "train_state.pt"
    step = load_state(state_path, head, optimizer, "head")
    if not state_path.is_file() and args.resume_from:
        head.load_state_dict(torch.load(args.resume_from)["head"])
    rng = random.Random(step)
    count = len(data["ids"])
    began, seen = time.perf_counter(), []
    head.train()
    while step < args.steps:
        lr = warm_cosine(args.lr, step, 50, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        picks = [rng.randrange(count) for _ in range(args.batch)]
        width = max(len(data["ids"][i]) for i in picks)
        ids = torch.zeros(args.batch, width, dtype=torch.long)
        features = torch.zeros(args.batch, width, head.hidden)
        valid = torch.zeros(args.batch, width, dtype=torch.bool)
        for row, i in enumerate(picks):
            n = len(data["ids"][i])
            ids[row, :n] = data["ids"][i].long()
            features[row, :n] = data["features"][i].float()
            valid[row, :n] = True
        regression, cross = losses(head, embed, out_weight, ids, features, valid, args.noise, args.unroll)
        loss = regression + args.cls_weight * cross
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        seen.append((regression.item(), cross.item(), int(valid.sum())))
        step += 1
        if step % 25 == 0:
            tokens = sum(s[2] for s in seen)
            print(f"step {step}: smooth-L1 {sum(s[0] for s in seen) / len(seen):.4f}, cross-entropy "
                  f"{sum(s[1] for s in seen) / len(seen):.3f}, lr {lr:.2e}, "
                  f"{tokens / (time.perf_counter() - began):.0f} tokens/s", flush=True)
            began, seen = time.perf_counter(), []
        if step % args.save_every == 0 or step == args.steps:
            save_state(state_path, head, optimizer, step, "head")


@torch.no_grad()
def stage_eval(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Teacher-forced on held-out answers: the head's first guess against the target's greedy token,
    and the tokens per pass of ``k`` chained guesses (the first guess from true features, the rest
    from the head's own)."""
    data = torch.load(work / "features.pt")
    rows = torch.load(Path(args.draft_work) / "heldout_answers.pt")
    target = load_target()
    kept = torch.tensor(data["kept_ids"])
    head = make_head(target, data["kept_ids"], args)
    state = torch.load(work / "train_state.pt")
    head.load_state_dict(state["head"])
    head.eval()
    embed = target.get_input_embeddings()
    out_weight = target.get_output_embeddings().weight.detach()[kept]
    first = total = 0
    passes: List[int] = []
    for request, answer in rows:
        seq = torch.tensor([request + answer])
        features = target.model(input_ids=seq).last_hidden_state
        n, start = seq.shape[1], len(request) - 1
        positions = torch.arange(n - 1)[None]
        predicted, _ = head(features[:, :-1], embed(seq[:, 1:]), positions)
        guesses = kept[(predicted[0] @ out_weight.T).argmax(-1)]  # guess for token t + 2
        hits = (guesses[start:-1] == seq[0, start + 2:]).tolist()
        first, total = first + sum(hits), total + len(hits)
        for s in range(start, n - 2, args.chain_stride):  # true pairs up to s, then k chained guesses
            _, past = head(features[:, :s], embed(seq[:, 1:s + 1]), positions[:, :s])
            hidden, _ = head(features[:, s:s + 1], embed(seq[:, s + 1:s + 2]), positions[:, s:s + 1], past)
            run, at = 0, s + 2
            while run < args.k and at < n:
                guess = kept[int((hidden[0, -1] @ out_weight.T).argmax())]
                if guess != seq[0, at]:
                    break
                run, at = run + 1, at + 1
                hidden, past = head(hidden[:, -1:], embed(guess.view(1, 1)), torch.tensor([[at - 2]]), past)
            passes.append(run + 1)
    alpha = first / total
    per_pass = sum(passes) / len(passes)
    print(f"step {state['step']}: first guess agrees on {alpha:.3f} of {total} held-out answer tokens; "
          f"k={args.k} chained guesses yield {per_pass:.2f} tokens per pass")
    return {"heldout_requests": len(rows), "heldout_answer_tokens": total, "first_guess_agreement": round(alpha, 4),
            f"tokens_per_pass_k{args.k}": round(per_pass, 3)}


def stage_export(args: argparse.Namespace, work: Path) -> None:
    data = torch.load(work / "features.pt")
    state = torch.load(work / "train_state.pt")
    head = make_head(load_target(), data["kept_ids"], args)
    head.load_state_dict(state["head"])
    settings = {k: getattr(args, k) for k in ("intermediate", "context", "doc_windows", "batch", "steps", "lr",
                                              "noise", "cls_weight", "unroll", "resume_from")}
    save_eagle_head(head, Path(args.out), {
        "command": "python scripts/train_smollm2_eagle.py all (see its docstring)", "settings": settings,
        "trained_steps": state["step"], "sequences": len(data["ids"]), "distilled_sequences": data["distilled"],
        "tokens": sum(len(i) for i in data["ids"]), **stage_eval(args, work)})
    print(f"exported to {args.out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("features", "train", "eval", "export", "all"))
    parser.add_argument("--draft-work", default="/tmp/accel-smollm2-draft")
    parser.add_argument("--work", default="/tmp/accel-smollm2-eagle")
    parser.add_argument("--out", default=str(ASSET))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--doc-windows", type=int, default=600)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--cls-weight", type=float, default=0.1)
    parser.add_argument("--unroll", type=int, choices=(1, 2), default=1,
                        help="2: also train the second drafting step on the head's own predicted feature")
    parser.add_argument("--resume-from", default=None,
                        help="start from this checkpoint's head (a new schedule and optimizer), e.g. to fine-tune")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--chain-stride", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = ("features", "train", "export") if args.stage == "all" else (args.stage,)
    for stage in stages:
        globals()[f"stage_{stage}"](args, work)


if __name__ == "__main__":
    main()
