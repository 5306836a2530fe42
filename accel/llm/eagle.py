"""An EAGLE draft head (Li et al., ICML 2024): a drafter that reads the target's own features.

A separate draft model must guess the target's next token from the text alone. EAGLE's head is
given more: the target's last hidden state ``f_t`` (the feature its output layer reads) and the
token that came after it, ``x_{t+1}``, and it predicts the next feature ``f_{t+1}``; the target's
own output layer turns that into a token. One decoder layer does the work, since the target has
already done most of it.

    head = EagleHead.for_target(target, kept_ids)     # untrained; or load_eagle_head(folder)
    speculative_generate(target, input_ids, draft=head, max_new_tokens=64)
    accel.patch(target, speculative=head)

How it drafts (``EagleProposer``, and ``EagleBatchProposer`` for batches, used by
``accel.llm.speculative``):
- the target's features are read from its final norm by a forward hook while decoding runs;
- after each verification the head reads the pairs ``(f_t, x_{t+1})`` of the positions the target
  kept, with the target's true features, and its last output gives the first guess;
- further guesses feed the head its own predicted feature and guess, one step each;
- the guesses leave the head's KV cache at the next verification: cut off at batch size 1;
  in a batch, whose rows keep different numbers of tokens, masked as holes (as
  ``speculative_batch`` does for the target's cache).

The head keeps its own small KV cache as two tensors, rather than a transformers ``Cache``: it is
one layer, rolled back every round, with a mask of its own per row in batches.

Its output layer scores only ``kept_ids`` (the target's output rows for those ids), which keeps
drafting cheap; an id outside them is never proposed. ``scripts/train_smollm2_eagle.py`` trains
the shipped head for SmolLM2-135M (``accel.pipelines.load("smollm2-eagle")``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EagleHead", "EagleProposer", "EagleBatchProposer", "save_eagle_head", "load_eagle_head"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Llama's layout (the two halves of each head rotated together)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class EagleHead(nn.Module):
    """``fc([embed(x_{t+1}), f_t])``, then one Llama decoder layer (RMSNorm, rotary grouped-query
    attention, SwiGLU), predicting ``f_{t+1}``. ``kept_ids``: the vocabulary ids it proposes."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int, kept_ids: Sequence[int],
                 vocab_size: int, rope_theta: float = 10000.0, eps: float = 1e-5) -> None:
        super().__init__()
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"EagleHead: hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads "
                             f"({kv_heads})")
        ids = [int(i) for i in kept_ids]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"EagleHead: kept_ids must be distinct ids in [0, {vocab_size}); got {len(ids)} ids")
        self.settings = {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate,
                         "vocab_size": vocab_size, "rope_theta": rope_theta, "eps": eps}
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.attn_norm = nn.RMSNorm(hidden, eps=eps)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden, eps=eps)
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.register_buffer("kept_ids", torch.tensor(ids), persistent=False)
        self.rope_theta = float(rope_theta)
        with torch.no_grad():  # start by passing the feature through: f_{t+1} guessed as f_t
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, hidden:] += torch.eye(hidden)
            self.fc.bias.zero_()

    @classmethod
    def for_target(cls, target: Any, kept_ids: Optional[Sequence[int]] = None, intermediate: Optional[int] = None
                   ) -> "EagleHead":
        """An (untrained) head shaped for ``target``'s config: its width, heads, rotary base; every id
        kept unless ``kept_ids`` is given."""
        c = target.config
        heads = c.num_attention_heads
        return cls(c.hidden_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                   intermediate or c.intermediate_size,
                   range(c.vocab_size) if kept_ids is None else kept_ids, c.vocab_size,
                   float(getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get(
                       "rope_theta", 10000.0)), float(getattr(c, "rms_norm_eps", 1e-5)))

    @property
    def hidden(self) -> int:
        return self.settings["hidden"]

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, attend: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``features, embeds: [B, T, H]`` (``f_t`` and the embedding of ``x_{t+1}``), ``positions: [B, T]``
        -> the predicted features ``[B, T, H]`` and the KV cache with these ``T`` positions appended.
        ``attend: [B, T, S]`` (S: cached + T) says which positions each new one reads; None: every
        cached one and the new ones up to itself."""
        batch, length, _ = features.shape
        x = self.fc(torch.cat([embeds, features], dim=-1))
        h = self.attn_norm(x)
        q = self.q(h).view(batch, length, self.heads, self.dim).transpose(1, 2)
        k = self.k(h).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v(h).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        # rotary angles in float32 whatever the head's dtype (half-precision positions lose whole steps)
        inv_freq = self.rope_theta ** -(torch.arange(0, self.dim, 2, device=q.device, dtype=torch.float32) / self.dim)
        angles = positions[:, None, :, None].float() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if attend is not None:
            mask: Any = attend[:, None]
        elif past is None or past[0].shape[2] == 0 or length == 1:  # causal alone, or one query reading all
            mask = None
        else:
            held = past[0].shape[2]
            mask = torch.ones(length, held + length, dtype=torch.bool, device=q.device).tril(held)
        grouped = self.heads // self.kv_heads
        keys = k.repeat_interleave(grouped, dim=1) if grouped > 1 else k
        values = v.repeat_interleave(grouped, dim=1) if grouped > 1 else v
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                           is_causal=mask is None and length > 1)
        x = x + self.o(a.transpose(1, 2).reshape(batch, length, -1))
        h = self.mlp_norm(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x, (k, v)


class _EagleDrafting:
    """What drafting with an ``EagleHead`` for ``target`` needs at any batch size: the target's
    features, read by a forward hook on its final norm (installed by ``attach``, removed by
    ``detach``), its embeddings, and its output rows for the head's kept ids."""

    def __init__(self, head: EagleHead, target: Any) -> None:
        check_head(head, target)
        self.head, self.target = head, target
        self.embed = target.get_input_embeddings()
        weight = target.get_output_embeddings().weight
        self.dtype = next(head.parameters()).dtype  # the head runs in its own dtype, whatever the target's
        self.out_weight = weight.detach()[head.kept_ids.to(weight.device)].to(self.dtype)  # [K, H]
        self.kept = head.kept_ids.to(weight.device)
        self.vocab = weight.shape[0]
        self.features: Optional[torch.Tensor] = None  # the target's latest final hidden states [B, T, H]
        self.handle: Any = None

    def attach(self) -> None:
        norm = final_norm(self.target)
        self.handle = norm.register_forward_hook(lambda module, args, out: setattr(self, "features", out))

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def full_logits(self, kept: torch.Tensor) -> torch.Tensor:
        """``[n, K]`` logits over the kept ids -> ``[n, V]``, ``-inf`` elsewhere."""
        logits = kept.new_full((kept.shape[0], self.vocab), float("-inf"))
        return logits.index_copy_(1, self.kept, kept)

    def _guess(self, hidden: torch.Tensor, sampler: Any, confidence: float
               ) -> Tuple[List[int], Optional[torch.Tensor], List[bool]]:
        """Each row's guess from head outputs ``[B, H]``: greedy, or drawn with ``sampler`` (then with
        the distributions ``[B, V]``), and whether the row's guess reached ``confidence``."""
        from .speculative import top_probability

        kept = hidden @ self.out_weight.T  # [B, K]
        if sampler is None:
            guess = self.kept[kept.argmax(-1)].tolist()
            sure = (top_probability(kept) >= confidence).tolist() if confidence else [True] * len(guess)
            return guess, None, sure
        probs = sampler.probs(self.full_logits(kept))
        guess = [sampler.draw(p) for p in probs]
        return guess, probs, [float(probs[b, g]) >= confidence for b, g in enumerate(guess)]


class EagleProposer(_EagleDrafting):
    """Drafting with an ``EagleHead`` at batch size 1: the head's KV cache is kept on the true
    positions, and proposals are greedy or sampled."""

    def __init__(self, head: EagleHead, target: Any) -> None:
        super().__init__(head, target)
        self.past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.true = 0  # positions the head's cache holds with the target's own features
        self.last: Optional[torch.Tensor] = None  # the head's newest output, [1, H]

    def _run(self, features: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        out, self.past = self.head(features.to(self.dtype), self.embed(tokens).to(self.dtype), positions, self.past)
        return out[0, -1:]

    def observe(self, kept: int, following: Sequence[int]) -> None:
        """After a target pass over ``checked`` positions: the first ``kept`` + 1 of them are true.
        The head reads their features with the tokens that followed each (``following``: the
        tokens after those positions, ``kept`` + 1 of them) and guesses on from the last."""
        features = self.features[:, :kept + 1]
        if self.past is not None:
            self.past = (self.past[0][:, :, :self.true], self.past[1][:, :, :self.true])
        tokens = torch.tensor([list(following)], device=features.device)
        self.last = self._run(features, tokens, self.true)
        self.true += kept + 1

    def start(self, prompt: torch.Tensor, first: int) -> None:
        """After the prompt's pass: the head reads the prompt's features with the next tokens."""
        following = prompt[0, 1:].tolist() + [first]
        self.observe(prompt.shape[1] - 1, following)

    def propose(self, count: int, sampler: Any = None, confidence: float = 0.0
                ) -> Tuple[List[int], Optional[torch.Tensor]]:
        """Up to ``count`` guesses after the true positions (greedy, or drawn with ``sampler`` with their
        distributions ``[n, V]``); stops after a guess whose probability is below ``confidence``."""
        proposal: List[int] = []
        probs: List[torch.Tensor] = []
        hidden = self.last
        at = self.true
        for step in range(count):
            guess, drawn, sure = self._guess(hidden, sampler, confidence)
            proposal.append(guess[0])
            if drawn is not None:
                probs.append(drawn[0])
            if not sure[0] or step == count - 1:
                break
            tokens = torch.tensor([[proposal[-1]]], device=hidden.device)
            hidden = self._run(hidden[None], tokens, at)
            at += 1
        return proposal, (torch.stack(probs) if probs else None)


class EagleBatchProposer(_EagleDrafting):
    """Drafting with an ``EagleHead`` for a batch whose rows keep different numbers of tokens. As in
    ``speculative_batch``, the head's cache only grows: every call appends the same number of
    positions to every row, and ``valid [B, S]`` marks what each row really holds (its true pairs,
    and while drafting its own guesses, which the next ``observe`` unmarks). A row's next position
    id is its count of valid positions."""

    def __init__(self, head: EagleHead, target: Any) -> None:
        super().__init__(head, target)
        self.past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.valid: Optional[torch.Tensor] = None
        self.guessed_from: Optional[int] = None  # the first cache column holding guesses
        self.last: Optional[torch.Tensor] = None  # each row's newest output, [B, H]

    def _append(self, features: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Run the head on ``[B, W]`` pairs, of which ``real`` count, after what each row holds."""
        batch, width = tokens.shape
        held = real.new_zeros(batch, 0) if self.valid is None else self.valid
        positions = (held.sum(1, keepdim=True) + real.long().cumsum(1) - 1).clamp_min(0)
        causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
        own = real[:, None, :] & causal | torch.eye(width, dtype=torch.bool, device=real.device)  # fillers: themselves
        attend = torch.cat([held[:, None, :].expand(batch, width, -1), own], dim=2)
        out, self.past = self.head(features.to(self.dtype), self.embed(tokens).to(self.dtype), positions, self.past,
                                   attend)
        self.valid = torch.cat([held, real], dim=1)
        return out

    def observe(self, rows: Sequence[Optional[Tuple[torch.Tensor, Sequence[int]]]]) -> None:
        """Each row's new true pairs: the target's features ``[n, H]`` at positions it kept and the
        ``n`` tokens that followed them (None: nothing for this row). The guesses made since the last
        call are forgotten; each row's first guess comes from its last pair."""
        if self.guessed_from is not None:
            self.valid[:, self.guessed_from:] = False
            self.guessed_from = None
        width = max(len(r[1]) for r in rows if r is not None)
        device = self.out_weight.device
        features = torch.zeros(len(rows), width, self.head.hidden, dtype=self.dtype, device=device)
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        real = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            if row is not None:
                count = len(row[1])
                features[b, :count] = row[0][:count]
                tokens[b, :count] = torch.tensor(list(row[1]), dtype=torch.long)
                real[b, :count] = True
        out = self._append(features, tokens, real)
        last = (real.long().sum(1) - 1).clamp_min(0)
        newest = out[torch.arange(len(rows), device=device), last]
        self.last = newest if self.last is None else torch.where(real.any(1, keepdim=True), newest, self.last)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ``[n]`` (in that order): rows that finished leave."""
        if self.past is not None:
            self.past = (self.past[0][rows], self.past[1][rows])
            self.valid = self.valid[rows]
        if self.last is not None:
            self.last = self.last[rows]

    def propose(self, room: Sequence[int], sampler: Any = None, confidence: float = 0.0
                ) -> Tuple[List[List[int]], List[Optional[torch.Tensor]]]:
        """Up to ``room[b]`` guesses for each row (greedy, or drawn with ``sampler``, with their
        distributions ``[n, V]``); a row stops after a guess whose probability is below
        ``confidence``."""
        batch = len(room)
        room = list(room)
        proposals: List[List[int]] = [[] for _ in range(batch)]
        probs: List[List[torch.Tensor]] = [[] for _ in range(batch)]
        self.guessed_from = self.valid.shape[1]
        hidden = self.last
        for step in range(max(room)):
            guess, drawn, sure = self._guess(hidden, sampler, confidence)
            for b in range(batch):
                if step < room[b]:
                    proposals[b].append(guess[b])
                    if drawn is not None:
                        probs[b].append(drawn[b])
                    if not sure[b]:
                        room[b] = step + 1
            if all(r <= step + 1 for r in room):
                break
            tokens = torch.tensor([[g] for g in guess], device=hidden.device)
            wanted = torch.tensor([[step < r - 1] for r in room], device=hidden.device)  # one more after it
            hidden = self._append(hidden[:, None], tokens, wanted)[:, 0]
        return proposals, [torch.stack(p) if p else None for p in probs]


def final_norm(target: Any) -> nn.Module:
    """The target's final norm (``model.norm`` in Llama, Qwen2, Mistral), whose output is the feature
    its output layer reads."""
    inner = getattr(target, getattr(target, "base_model_prefix", "model"), None)
    norm = getattr(inner, "norm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"EAGLE head: the target must be a transformers decoder LM with a final norm "
                        f"(.{getattr(target, 'base_model_prefix', 'model')}.norm); got {type(target).__name__}")
    return norm


def check_head(head: EagleHead, target: Any) -> None:
    """A ``ValueError`` unless ``head`` fits ``target``: the same width and vocabulary."""
    config = getattr(target, "config", None)
    width, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
    if head.settings["hidden"] != width or head.settings["vocab_size"] != vocab:
        raise ValueError(f"speculative: the EAGLE head was made for width {head.settings['hidden']} and "
                         f"{head.settings['vocab_size']} ids; the target has width {width} and {vocab} ids")
    final_norm(target)


def save_eagle_head(head: EagleHead, out: Path, training: Dict[str, Any]) -> None:
    """float16 weights (``model.safetensors``), ``config.json`` (shape and kept ids) and
    ``training.json`` into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**head.settings, "kept_ids": head.kept_ids.tolist()}) + "\n")
    (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")


def load_eagle_head(folder: Path, dtype: torch.dtype = torch.float32) -> EagleHead:
    """The head saved by ``save_eagle_head`` in ``folder``, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"EAGLE head: no weights in {folder}")
    settings = json.loads((folder / "config.json").read_text())
    kept = settings.pop("kept_ids")
    head = EagleHead(kept_ids=kept, **settings)
    head.load_state_dict(load_file(str(folder / "model.safetensors")))
    return head.to(dtype).eval()
