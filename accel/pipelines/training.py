"""What the training scripts of the built-in models share: seeded batches, augmentation, the
AdamW + warm-up/cosine recipe, and checkpoints that make every run resumable.

Batch order is a function of (seed, epoch) and augmentation of (seed, step), so a run resumed
from a checkpoint sees the same data as one that was never interrupted.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["augment", "lr_factor", "make_optimizer", "batch_indices", "step_generator", "Checkpoint",
           "add_training_args", "train_loop", "recorded_args"]


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels (background filled) and horizontal flip: ``x: [B, C, H, W]``."""
    batch, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    flips = torch.rand(batch, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(batch)])
    return torch.where(flips[:, None, None, None], out.flip(-1), out) if flip else out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warm_cosine(lr: float, step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The learning rate of ``step``: ``lr`` times a linear warm-up over the first ``warmup`` steps,
    times a cosine over all ``total`` steps from 1 down to ``floor`` (the schedule of the built-in
    language model's draft and EAGLE head; ``lr_factor`` is the vision scripts')."""
    return lr * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int, total: int):
    """AdamW without decay on biases, norms and embeddings, and its warm-up/cosine schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        embedding = "pos_embed" in name or name.endswith("embedding.weight")
        (decay if param.ndim > 1 and not embedding else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    return optimizer, scheduler


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> Tuple[int, torch.Tensor]:
    """(epoch, indices of the items of ``step``): each epoch a seeded permutation."""
    steps_per_epoch = math.ceil(num_items / batch_size)
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return epoch, order[index * batch_size:(index + 1) * batch_size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step (augmentation, noise, dropout of conditions)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Checkpoint:
    """Model, optimiser, schedule and step in one file, written atomically."""

    def __init__(self, path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        self.path = Path(path)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def resume(self) -> int:
        """The step to continue from (0 without a checkpoint)."""
        if not self.path.exists():
            return 0
        state: Dict[str, Any] = torch.load(self.path, map_location="cpu")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {self.path} at step {state['step']}", flush=True)
        return int(state["step"])

    def save(self, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": step}, tmp)
        tmp.replace(self.path)


def load_state(path: Path, module: torch.nn.Module, optimizer: Any, key: str) -> int:
    """Resume from a file written by ``save_state`` (module under ``key``, optimiser, step): the step
    to continue from, 0 without the file. The language-model scripts' format, which has no
    schedule state (their schedule is a function of the step); ``Checkpoint`` is the vision one."""
    if not Path(path).is_file():
        return 0
    state = torch.load(path)
    module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def save_state(path: Path, module: torch.nn.Module, optimizer: Any, step: int, key: str) -> None:
    """Write ``module`` (under ``key``), ``optimizer`` and ``step`` to ``path`` atomically."""
    path = Path(path)
    torch.save({key: module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                      weight_decay: float, warmup_steps: int, work_dir: Path, checkpoint_every: int = 100) -> None:
    """The options every training script has, with the script's own defaults."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: auto)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    parser.add_argument("--work-dir", type=Path, default=work_dir, help="checkpoints (resumed from if present)")


def train_loop(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor], *, num_items: int,
               args: argparse.Namespace, clip_grad: Optional[float] = 1.0,
               after_step: Optional[Callable[[], None]] = None,
               after_epoch: Optional[Callable[[int], None]] = None, log_every: int = 50) -> Tuple[int, int]:
    """Run (or resume) ``args.epochs`` epochs of ``loss_at(step)`` with the shared recipe.

    Returns ``(steps done, total steps)``; fewer than total when ``args.max_steps`` stopped it.
    """
    total = args.epochs * math.ceil(num_items / args.batch_size)
    optimizer, scheduler = make_optimizer(model, args.lr, args.weight_decay, args.warmup_steps, total)
    checkpoint = Checkpoint(Path(args.work_dir) / "checkpoint.pt", model, optimizer, scheduler)
    step = checkpoint.resume()
    stop = min(total, args.max_steps) if args.max_steps else total
    steps_per_epoch = math.ceil(num_items / args.batch_size)
    start_time, losses = time.time(), []
    while step < stop:
        model.train()
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        step += 1
        losses.append(loss.item())
        if step % log_every == 0 or step == stop:
            recent = losses[-log_every:]
            print(f"step {step}/{total} loss {sum(recent) / len(recent):.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                  f"{(time.time() - start_time) / len(losses):.2f}s/step", flush=True)
        if step % args.checkpoint_every == 0 or step == stop:
            checkpoint.save(step)
        if after_epoch is not None and step % steps_per_epoch == 0:
            after_epoch(step // steps_per_epoch - 1)
    if step < total:
        print(f"stopped at step {step}/{total} (--max-steps); rerun to resume", flush=True)
    return step, total


def recorded_args(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """The options of a run as JSON values, paths relative to ``root`` where they lie under it."""
    def plain(value: Any) -> Any:
        if not isinstance(value, Path):
            return value
        try:
            return str(value.resolve().relative_to(root.resolve()))
        except ValueError:
            return str(value)

    return {key: plain(value) for key, value in vars(args).items()}
