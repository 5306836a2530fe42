"""Dense vs Mixture of Experts vs Mixture of Depths at equal training compute, on real text: train
the three small models of ``accel.pipelines.llm_study`` and measure them.

Real text: the Python 3.11 documentation's reST sources from Debian's ``python3.11-doc`` (PSF
licence), fetched without installing anything::

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/train_llm_study.py all --docs /tmp/pydoc/usr/share/doc/python3.11/html/_sources

Every tenth file (by a hash of its path, the rule of the SmolLM2 draft's script) is held out: no
training step sees it, and every loss below is measured on it.

Stages (each resumable; ``all`` runs them in order; the work folder keeps what is done):
- ``data``: a 4,096-token byte-level BPE (``tokenizers``) trained on the held-in files, and both
  splits tokenised (each file followed by ``</s>``).
- ``train --arch dense|moe|mod``: windows of ``--context`` tokens drawn at random (seeded by the
  step), AdamW, warm-up then cosine; every model trains until it has spent the same training
  compute (``--budget`` FLOPs, 3x the forward FLOPs per token of ``forward_flops``), so a model
  whose forward pass is cheaper takes more steps. Held-out loss is logged along the way (the plot's
  curve). Checkpointed and resumable.
- ``eval``: held-out loss on every held-out window (MoD: routed by top-k as in training, and
  causally, by its predictors, as when decoding), the predictors' agreement with top-k, forward
  FLOPs, and greedy decoding speed (the three models interleaved, medians).
- ``report``: the table (``study.json``) and the loss-vs-FLOPs plot (``study.png``) into ``--docs-out``.
- ``export``: float16 weights, config and tokenizer into ``assets/llm-study/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.pipelines.llm_study import (ARCHS, ASSET_DIR, MOD_CAPACITY, MOD_LAYERS, build, forward_flops,  # noqa: E402
                                       heldout_tokens, load_study_model, special_tokens, study_config)
from accel.eval.llm import causal_agreement, decode_rates, heldout_loss, spread_prompts  # noqa: E402
from accel.pipelines.training import load_state, save_state, warm_cosine  # noqa: E402


def held_out(relative: str) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 10 == 0


# -- data ------------------------------------------------------------------------------------------


def stage_data(args: argparse.Namespace, work: Path) -> None:
    if (work / "data.pt").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(args.docs.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt under {args.docs}; see this script's docstring")
    split: Dict[str, List[str]] = {"train": [], "heldout": []}
    for path in files:
        split["heldout" if held_out(str(path.relative_to(args.docs))) else "train"].append(
            path.read_text(encoding="utf-8", errors="replace"))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=list(special_tokens()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    began = time.perf_counter()
    tokenizer.train_from_iterator(split["train"], trainer)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens in {time.perf_counter() - began:.1f} s", flush=True)
    tokenizer.save(str(work / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    data = {}
    for name, texts in split.items():
        ids: List[int] = []
        for encoding in tokenizer.encode_batch(texts):
            ids += encoding.ids + [eos]
        data[name] = torch.tensor(ids, dtype=torch.int16)
        print(f"{name}: {len(texts)} files, {len(ids):,} tokens, {sum(map(len, texts)):,} characters", flush=True)
    torch.save(data, work / "data.pt")


# -- training --------------------------------------------------------------------------------------


def aux_loss(arch: str, model: Any, routers: Any) -> torch.Tensor:
    """MoE: Switch's load-balancing loss, summed over layers, weighted 0.01. MoD: each wrapped layer's
    predictor BCE plus 0.01 times its router's BCE (``MoDRouters.aux_loss``'s default, measured with
    this script's settings)."""
    if arch == "moe":
        return 0.01 * sum(layer.mlp.losses["load_balancing"] for layer in model.model.layers)
    if arch == "mod":
        return routers.aux_loss()
    return torch.zeros(())


def bundle(model: Any, routers: Any) -> torch.nn.ModuleDict:
    """What trains and what the training state holds: the model, and MoD's routers beside it."""
    return torch.nn.ModuleDict({"model": model, **({"routers": routers} if routers is not None else {})})


def stage_train(args: argparse.Namespace, work: Path) -> None:
    data = torch.load(work / "data.pt")
    config = study_config(args.vocab)
    model, routers = build(args.arch, config, seed=args.seed)
    trained = bundle(model, routers)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    folder = work / args.arch
    folder.mkdir(exist_ok=True)
    state_path, log_path = folder / "train_state.pt", folder / "log.json"
    step = load_state(state_path, trained, optimizer, "model")
    log = json.loads(log_path.read_text()) if log_path.is_file() and step else {"points": [], "seconds": 0.0}
    step_flops = 3 * forward_flops(args.arch, config, args.context) * args.batch * args.context
    steps = int(args.budget // step_flops)
    text = data["train"]
    began, losses = time.perf_counter(), []
    model.train()
    while step < steps:
        rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        starts = torch.randint(len(text) - args.context - 1, (args.batch,), generator=rng)
        rows = torch.stack([text[s:s + args.context + 1].long() for s in starts.tolist()])
        lr = warm_cosine(args.lr, step, 100, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(rows[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_loss(args.arch, model, routers)).backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == steps:
            model.eval()
            held = heldout_loss(model, data["heldout"], args.context, args.log_windows)
            model.train()
            log["seconds"] += time.perf_counter() - began
            log["points"].append({"step": step, "train_flops": step * step_flops, "train_loss": statistics.mean(losses),
                                  "heldout_loss": held, "seconds": log["seconds"]})
            print(f"{args.arch} step {step}/{steps}: train {statistics.mean(losses):.3f}, held-out {held:.3f}, "
                  f"lr {lr:.2e}, {log['seconds']:.0f} s", flush=True)
            log.update(steps=steps, step_flops=step_flops, batch=args.batch, context=args.context, lr=args.lr,
                       seed=args.seed, budget=args.budget)
            save_state(state_path, trained, optimizer, step, "model")
            log_path.write_text(json.dumps(log, indent=1) + "\n")
            began, losses = time.perf_counter(), []


def trained_model(arch: str, work: Path, vocab: int):
    model, routers = build(arch, study_config(vocab))
    bundle(model, routers).load_state_dict(torch.load(work / arch / "train_state.pt")["model"])
    return model.eval(), routers


# -- evaluation ------------------------------------------------------------------------------------


def stage_eval(args: argparse.Namespace, work: Path) -> None:
    from accel.eval.report import machine_description

    heldout = torch.load(work / "data.pt")["heldout"]
    config = study_config(args.vocab)
    record: Dict[str, Any] = {"machine": machine_description("transformers"), "load average": os.getloadavg()[0],
                              "heldout tokens": len(heldout), "rows": []}
    models = {arch: trained_model(arch, work, args.vocab) for arch in ARCHS if (work / arch / "log.json").is_file()}
    for arch, (model, routers) in models.items():
        log = json.loads((work / arch / "log.json").read_text())
        row = {"arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
               "router parameters": 0 if routers is None else sum(p.numel() for p in routers.parameters()),
               "forward MFLOPs per token": forward_flops(arch, config, args.context) / 1e6,
               "train PFLOPs": log["steps"] * log["step_flops"] / 1e15, "steps": log["steps"],
               "train tokens": log["steps"] * log["batch"] * log["context"], "train seconds": log["seconds"],
               "held-out loss": heldout_loss(model, heldout, args.context)}
        if routers is not None:
            routers.routing = "causal"
            row["held-out loss, causal routing"] = heldout_loss(model, heldout, args.context)
            routers.routing = "top_k"
            row["predictor agreement"] = causal_agreement(model, routers, heldout, args.context)
            row["router agreement"] = causal_agreement(model, routers, heldout, args.context, by="router")
        record["rows"].append(row)
        print(row, flush=True)
    prompts = spread_prompts(heldout, args.prompts, args.prompt_tokens)
    rates, used = decode_rates({arch: m for arch, (m, _) in models.items()}, prompts, args.new_tokens, args.repeats)
    for row in record["rows"]:
        row["decode tokens/s"] = rates[row["arch"]]
    record.update({"load average after": os.getloadavg()[0], "decode cpu_per_wall": used,
                   "decoding": {"prompts": args.prompts, "prompt tokens": args.prompt_tokens,
                                "new tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads}})
    (work / "eval.json").write_text(json.dumps(record, indent=2) + "\n")


# -- report and export -----------------------------------------------------------------------------


def stage_report(args: argparse.Namespace, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads((work / "eval.json").read_text())
    record["curves"] = {arch: json.loads((work / arch / "log.json").read_text())["points"] for arch in ARCHS
                        if (work / arch / "log.json").is_file()}
    record["command"] = "python scripts/train_llm_study.py all --docs <python3.11-doc _sources>"
    figure, axis = plt.subplots(figsize=(6, 4))
    for arch, points in record["curves"].items():
        axis.plot([p["train_flops"] / 1e15 for p in points], [p["heldout_loss"] for p in points], label=arch)
    axis.set_xlabel("training compute (PFLOPs)")
    axis.set_ylabel(f"held-out loss (first {args.log_windows} windows)")
    axis.set_title("dense vs MoE vs MoD at equal training compute")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    args.docs_out.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.docs_out / "llm_study.png", dpi=120)
    (args.docs_out / "llm_study.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.docs_out / 'llm_study.png'} and {args.docs_out / 'llm_study.json'}")


def stage_export(args: argparse.Namespace, work: Path) -> None:
    from safetensors.torch import save_file

    from accel.llm import mod

    assets = args.assets
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "tokenizer.json").write_text((work / "tokenizer.json").read_text())
    heldout = torch.load(work / "data.pt")["heldout"][:args.ship_tokens].contiguous()
    save_file({"ids": heldout}, str(assets / "heldout.safetensors"),
              metadata={"source": "Debian python3.11-doc reST sources (PSF licence), held-out files",
                        "tokens": str(len(heldout))})
    evaluated = {row["arch"]: row for row in json.loads((work / "eval.json").read_text())["rows"]}
    for arch in ARCHS:
        model, routers = trained_model(arch, work, args.vocab)
        where = assets / arch
        where.mkdir(exist_ok=True)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
                 if k != "lm_head.weight"}  # tied to the embeddings
        save_file(state, str(where / "model.safetensors"))
        if routers is not None:
            mod.save_routers(routers, where / "routers.safetensors")
        log = json.loads((work / arch / "log.json").read_text())
        settings = {"config": {"vocab_size": args.vocab}, "arch": arch,
                    "mod": {"layers": list(MOD_LAYERS), "capacity": MOD_CAPACITY} if arch == "mod" else None,
                    "training": {k: log[k] for k in ("steps", "batch", "context", "lr", "seed", "budget", "seconds")},
                    "held-out loss (float32, before export)": evaluated[arch]["held-out loss"]}
        (where / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
        # what the shipped (float16) weights score on the shipped held-out tokens: the tests' number
        shipped, _ = load_study_model(arch, assets)
        settings["shipped held-out loss"] = {"loss": heldout_loss(shipped, heldout_tokens(assets), args.context, 8),
                                             "windows": 8, "context": args.context}
        (where / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
        print(f"{arch}: {sum(v.numel() for v in state.values()):,} weights -> {where}; held-out loss of the "
              f"shipped weights {settings['shipped held-out loss']['loss']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("data", "train", "eval", "report", "export", "all"))
    parser.add_argument("--docs", type=Path, default=Path("/tmp/pydoc/usr/share/doc/python3.11/html/_sources"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm-study"))
    parser.add_argument("--docs-out", type=Path, default=ROOT / "docs")
    parser.add_argument("--assets", type=Path, default=ASSET_DIR, help="export: where the shipped models go")
    parser.add_argument("--arch", choices=ARCHS, default=None, help="train: one model (default: all three in turn)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=7e13, help="training FLOPs per model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--log-windows", type=int, default=64, help="held-out windows per logged point")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="eval: decoding prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ship-tokens", type=int, default=32768, help="export: held-out tokens shipped for accel bench --llm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("data", "all"):
        stage_data(args, args.work)
    if args.stage in ("train", "all"):
        for arch in [args.arch] if args.arch else ARCHS:
            args.arch = arch
            stage_train(args, args.work)
    for stage in ("eval", "report", "export"):
        if args.stage in (stage, "all"):
            globals()[f"stage_{stage}"](args, args.work)


if __name__ == "__main__":
    main()
