"""Mixture of Depths (Raposo et al. 2024) for transformers causal LMs: chosen decoder layers run on
some tokens only; the others pass them by on the residual stream.

    from accel.llm import mod
    routers = mod.wrap(model, layers=[1, 3], capacity=0.125)     # Llama, Qwen2, Mistral; "eager" or "sdpa"
    out = model(input_ids, labels=input_ids)                      # top-k routing per sequence
    loss = out.loss + routers.aux_loss()                          # + predictor BCE + 0.01 x router BCE
    model.generate(ids, max_new_tokens=16)                        # causal routing, per-layer KV caches of its own
    routers.routing = "causal"                                    # a full forward routed as decoding routes
    mod.save_routers(routers, "routers.safetensors"); mod.load_routers(routers, "routers.safetensors")
    routers.remove()                                              # the model exactly as before

**A wrapped layer** (paper Sec. 3): a router ``r = w·x + b`` per token of its input x [B, T, C].
Without a cache given by the caller, the ``k = ceil(capacity·T)`` tokens of each row with the largest
``r`` are chosen (top-k, Sec. 3.3; padding tokens last); only they run the layer: gathered in their
original order into [B, k, C], with their rotary embeddings and position ids at their original
positions and the model's own attention mask restricted to them (causal among the chosen, padding
kept). The layer returns ``x_s + f(x_s)``; ``f`` scaled by the router weight is added to the
residual, ``x_s + w·f`` (Eq. 1), the other tokens pass bit for bit. ``weight="router"``: ``w = r``
(the paper); ``"sigmoid"``: ``w = σ(r)``. The router has a bias, so ``w ≡ 1`` is reachable (weight 0,
bias 1): capacity 1 then gives the unwrapped model.

**Causal routing** (Sec. 3.5): top-k over a sequence looks ahead. Two BCE losses learn a causal
decision with top-k membership as the target: (a) on the router's own logit (its gradient reaches
the router and, through its input, the model, as in the paper), (b) on a small predictor MLP
[C -> C/8 (at least 16) -> 1] reading the layer input with a stop-gradient (it trains nothing else).
``decode_by`` ("predictor" | "router") says which decides: a token is chosen when its logit > 0
(probability > 0.5). Every forward given a cache (``generate``, or ``model(..., cache=c)``) routes
causally, the prompt too, so the result does not depend on how a sequence is chunked; a full
forward with ``routing="causal"`` equals token-by-token decoding. ``capacity`` does not bind there.

**Caches**: a chosen token writes its keys and values to the layer's own cache (``mod_cache.LayerKV``,
kept per cache object the caller gave, weakly, so a new ``generate`` starts fresh); a skipped token
writes none. The shared transformers cache only gets a one-number placeholder per token in this
layer's slot, so its length (positions, mask sizes) stays that of the sequence. Supported: the
``DynamicCache`` of full-attention layers; a cache reordered or cropped outside a forward (beam
search, assisted decoding) or filled by a top-k forward is refused with a ``RuntimeError``.

**Batch > 1**: rows choose differently. A layer runs on ``K`` = the most tokens any row chose
(skipped entirely when no row chose any); shorter rows are filled with holes whose outputs are
dropped and whose keys are masked out of attention (kept in the cache as masked entries). Each row
therefore equals that row run alone (up to float summation order; the masked terms are exact
zeros), left padding included (padding is never chosen, and is masked as the model masks it).
Compute is saved in proportion to the most active row; memory of the own cache grows with it.

Parameters live in the returned ``MoDRouters`` (an ``nn.Module``, on the model's device and
dtype, seeded); the model's state_dict is untouched. Untrained routers on a pretrained model change
its outputs (``w = r`` starts near 0): wrapping one is only for training the routers.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import HookGroup, hooked_methods
from ..patches.settings import check_choice, check_int, check_real
from .mod_cache import (LayerCaches, LayerKV, check_cache, chosen_indices, compact_mask, gather_tokens,
                        mark_shared, scatter_tokens, token_validity, top_k_indices)

__all__ = ["wrap", "MoDRouters", "MoDRouter", "RoutingRecord", "save_routers", "load_routers",
           "predictor_agreement", "predictor_width", "routers_of", "WEIGHTS", "DECIDERS", "ROUTINGS", "ATTENTION"]

WEIGHTS = ("router", "sigmoid")         # w = r (the paper) or sigmoid(r)
DECIDERS = ("predictor", "router")      # what decides a token causally
ROUTINGS = ("top_k", "causal")          # a forward without a cache given
ATTENTION = ("eager", "sdpa")           # the attention implementations supported
_OWNER = "mod.wrap"


class MoDRouter(nn.Module):
    """One layer's router ``Linear(C, 1)`` and causal predictor ``C -> hidden -> 1`` (SiLU)."""

    def __init__(self, hidden_size: int, predictor_hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.router = nn.Linear(hidden_size, 1)
        self.predictor = nn.Sequential(nn.Linear(hidden_size, predictor_hidden), nn.SiLU(),
                                       nn.Linear(predictor_hidden, 1))
        with torch.no_grad():
            for linear in (self.router, self.predictor[0], self.predictor[2]):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / math.sqrt(linear.in_features))
                linear.bias.zero_()


@dataclasses.dataclass
class RoutingRecord:
    """One wrapped layer in the last forward without a cache; all [B, T].

    router_logits, predictor_logits: r and the predictor's logit; target: top-k membership (the BCE
    target); selected: the tokens that ran the layer; valid: not padding (the losses' tokens)."""

    router_logits: torch.Tensor
    predictor_logits: torch.Tensor
    target: torch.Tensor
    selected: torch.Tensor
    valid: torch.Tensor

    def router_loss(self) -> torch.Tensor:
        return _bce(self.router_logits, self.target, self.valid)

    def predictor_loss(self) -> torch.Tensor:
        return _bce(self.predictor_logits, self.target, self.valid)


def _bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    weight = valid.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), weight=weight, reduction="sum")
    return loss / weight.sum().clamp(min=1)


def predictor_agreement(logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """How often a causal decision (``logits > 0``) equals top-k membership ``target``: the fraction
    of the (valid) tokens where they agree. logits, target, valid: [B, T]."""
    agree = (logits > 0) == target.bool()
    if valid is not None:
        agree = agree[valid.bool()]
    return float(agree.double().mean()) if agree.numel() else float("nan")


@dataclasses.dataclass
class _Call:
    cache: Any  # the cache the caller gave the model (None: a forward routed by the routing setting)


class _ModelHook:
    """On the base model's forward: notes whether the caller gave a cache; clears the records."""

    def __init__(self, routers: "MoDRouters") -> None:
        self.routers = routers

    def __call__(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and len(args) > 3:  # (input_ids, attention_mask, position_ids, cache, ...)
            cache = args[3]
        routers = self.routers
        previous, routers._call = routers._call, _Call(cache)
        routers.records = {}
        try:
            return call_next(*args, **kwargs)
        finally:
            routers._call = previous


class _LayerHook:
    """On a wrapped decoder layer's forward: routes its tokens (``MoDRouters._route``)."""

    def __init__(self, routers: "MoDRouters", index: int, names: Sequence[str]) -> None:
        self.routers, self.index, self.names = routers, index, tuple(names)

    def __call__(self, layer: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        given = dict(zip(self.names, args))
        given.update(kwargs)
        if "past_key_values" in given:
            given.setdefault("cache", given.pop("past_key_values"))
        return self.routers._route(self.index, layer, call_next, given)


class MoDRouters(nn.Module):
    """The routers of a wrapped model (made by ``wrap``), and its Mixture-of-Depths settings.

    ``routers[str(i)]``: layer ``i``'s ``MoDRouter``. Settings (checked when set): ``capacity``,
    ``weight``, ``decode_by``, ``routing``. ``records``: {layer: RoutingRecord} of the last forward
    without a cache. ``remove()`` takes every hook off; the parameters stay here."""

    def __init__(self, layers: Sequence[int], hidden_size: int, predictor_hidden: int, seed: int) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.routers = nn.ModuleDict({str(i): MoDRouter(hidden_size, predictor_hidden,
                                                        torch.Generator().manual_seed(seed + i)) for i in layers})
        self.records: Dict[int, RoutingRecord] = {}
        self._hooks = HookGroup()
        self._call: Optional[_Call] = None
        self._kv = LayerCaches()
        self._attention = "sdpa"

    # -- settings ---------------------------------------------------------------------------------
    capacity = property(lambda self: self._capacity)
    weight = property(lambda self: self._weight)
    decode_by = property(lambda self: self._decode_by)
    routing = property(lambda self: self._routing)

    @capacity.setter
    def capacity(self, value: Any) -> None:
        self._capacity = check_real("MoDRouters", "capacity", value, lambda v: 0 < v <= 1, "a float in (0, 1]")

    @weight.setter
    def weight(self, value: Any) -> None:
        self._weight = check_choice("MoDRouters", "weight", value, WEIGHTS)

    @decode_by.setter
    def decode_by(self, value: Any) -> None:
        self._decode_by = check_choice("MoDRouters", "decode_by", value, DECIDERS)

    @routing.setter
    def routing(self, value: Any) -> None:
        self._routing = check_choice("MoDRouters", "routing", value, ROUTINGS)

    def __getstate__(self) -> Dict[str, Any]:  # copies start with no caches and no records
        state = dict(super().__getstate__())
        state["_kv"], state["_call"], state["records"] = LayerCaches(), None, {}
        return state

    # -- losses and statistics --------------------------------------------------------------------
    def losses(self) -> Dict[int, Dict[str, torch.Tensor]]:
        """{layer: {"router": BCE, "predictor": BCE}} of the last forward without a cache."""
        if not self.records:
            raise RuntimeError("MoDRouters: no forward without a cache since the last call (decoding computes no loss)")
        return {i: {"router": r.router_loss(), "predictor": r.predictor_loss()} for i, r in self.records.items()}

    def aux_loss(self, router_weight: float = 0.01) -> torch.Tensor:
        """Each wrapped layer's predictor BCE plus ``router_weight`` times its router's BCE, summed,
        from the last forward without a cache. The predictor's input is detached, so its loss trains
        the predictor alone; the router's reaches the model through its input. Weighted 1, the
        router's loss kept a small Llama from learning (``scripts/train_llm_study.py``: language-model
        loss 6.9 after 120 steps where the dense model reached 5.7; 0.1 gave 6.6, 0.01 gave 5.7)."""
        check_real("MoDRouters.aux_loss", "router_weight", router_weight, lambda v: 0 <= v < float("inf"),
                   "a finite float >= 0")
        return sum(parts["predictor"] + router_weight * parts["router"] for parts in self.losses().values())

    def agreement(self, by: Optional[str] = None) -> Dict[int, float]:
        """{layer: fraction of tokens whose causal decision (``by``: "predictor" or "router", default
        ``decode_by``) equals top-k membership}, from the last forward without a cache."""
        by = self.decode_by if by is None else check_choice("MoDRouters.agreement", "by", by, DECIDERS)
        if not self.records:
            raise RuntimeError("MoDRouters: no forward without a cache since the last call")
        return {i: predictor_agreement(r.predictor_logits if by == "predictor" else r.router_logits,
                                       r.target, r.valid) for i, r in self.records.items()}

    def kv_cache(self, cache: Any, layer: int) -> Optional[LayerKV]:
        """Layer ``layer``'s own KV cache for the decoding that uses ``cache`` (None before it ran)."""
        return self._kv.find(cache, layer)

    def remove(self) -> None:
        """Take every hook off the model: it computes exactly as before ``wrap``."""
        self._hooks.remove_all()
        self._kv = LayerCaches()
        self.records = {}

    # -- the wrapped layer ------------------------------------------------------------------------
    def _route(self, index: int, layer: nn.Module, call_next: Any, given: Dict[str, Any]) -> Any:
        x = given.pop("hidden_states")
        mask = given.pop("attention_mask", None)
        cache = given.pop("cache", None)
        position_ids = given.pop("position_ids", None)
        embeddings = given.pop("position_embeddings", None)
        if embeddings is None:
            raise TypeError(f"mod: layer {index} got no position_embeddings; it needs the (cos, sin) the model computes")
        B, T, _ = x.shape
        slot = getattr(getattr(layer, "self_attn", None), "layer_idx", index)
        call = self._call
        decoding = (call.cache if call is not None else cache) is not None and cache is not None
        if cache is not None:
            check_cache(cache, slot)
        kv = self._kv.get(cache, index, slot, B) if decoding else None
        offset = kv.seen if decoding else (mask.shape[-1] - T if mask is not None else 0)
        if decoding and mask is not None and mask.shape[-1] != offset + T:
            raise RuntimeError(f"mod: layer {index} got a mask over {mask.shape[-1]} keys; expected {offset + T}")
        valid = token_validity(mask, offset, B)

        router = self.routers[str(index)]
        logits = router.router(x).squeeze(-1)                                       # r: [B, T]
        predictor = None
        if not decoding or self.decode_by == "predictor":
            predictor = router.predictor(x.detach()).squeeze(-1)                    # stop-gradient (Sec. 3.5)
        hole = None
        if not decoding:  # top-k membership: the selection, or the target of the causal decisions
            scores = logits.detach() if valid is None else logits.detach().masked_fill(~valid, float("-inf"))
            k = max(1, min(T, math.ceil(self.capacity * T - 1e-9)))
            idx = top_k_indices(scores, k)
            target = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter(1, idx, True)
        if decoding or self.routing == "causal":
            decider = predictor if self.decode_by == "predictor" else logits
            chosen = decider.detach() > 0
            if valid is not None:
                chosen = chosen & valid
            idx, hole = chosen_indices(chosen)
        if not decoding:
            selected = target if hole is None else chosen
            self.records[index] = RoutingRecord(logits, predictor, target, selected,
                                                torch.ones_like(target) if valid is None else valid)

        out = x
        if idx.shape[1] > 0:
            out = self._run(layer, call_next, x, logits, idx, hole, mask, offset, position_ids, embeddings,
                            kv, given)
        if cache is not None:
            mark_shared(cache, slot, x, kv)
        return out

    def _run(self, layer: nn.Module, call_next: Any, x: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor,
             hole: Optional[torch.Tensor], mask: Optional[torch.Tensor], offset: int,
             position_ids: Optional[torch.Tensor], embeddings: Any, kv: Optional[LayerKV],
             given: Dict[str, Any]) -> torch.Tensor:
        """The layer on the chosen tokens idx [B, K] (holes: hole [B, K]); x with x_s + w·f there."""
        B, T, _ = x.shape
        rows = idx.clamp(max=T - 1)
        slots = offset + rows
        x_s = gather_tokens(x, rows)
        cos, sin = (gather_tokens(part, rows) for part in embeddings)
        positions = None if position_ids is None else gather_tokens(position_ids, rows)
        ok = None if hole is None else ~hole
        if kv is not None:
            past_slots, past_ok = kv.past(B, x.device)
            cols = torch.cat([past_slots, slots], dim=1)
            now_ok = torch.ones_like(rows, dtype=torch.bool) if ok is None else ok
            col_ok = torch.cat([past_ok, now_ok], dim=1)
            kv.pending = (slots, now_ok)
        else:
            cols, col_ok = slots, ok
        eager = self._attention == "eager"
        if mask is None and kv is None and hole is None and not eager:
            small_mask = None  # causal among the chosen: sdpa's is_causal
        else:
            small_mask = compact_mask(mask, rows, cols, slots, col_ok, hole, x.dtype if eager else None)
        out_s = call_next(x_s, attention_mask=small_mask, position_ids=positions, cache=kv,
                          position_embeddings=(cos, sin), **given)                 # x_s + f(x_s): [B, K, C]
        if kv is not None and kv.pending is not None:
            kv.pending = None
            raise RuntimeError("mod: the layer wrote no keys to its cache (gradient checkpointing in training "
                               "mode drops caches); decode in eval mode or without gradients")
        w = gather_tokens(logits, rows)
        if self.weight == "sigmoid":
            w = torch.sigmoid(w)
        new = x_s + w.unsqueeze(-1) * (out_s - x_s)  # Eq. 1: only f is scaled, never the residual
        return scatter_tokens(x, idx, new, hole)


def predictor_width(hidden_size: int) -> int:
    """The causal predictor's default hidden width for a model of width ``hidden_size``: C/8, at least 16."""
    return max(16, hidden_size // 8)


def routers_of(model: nn.Module) -> Optional[MoDRouters]:
    """The ``MoDRouters`` that ``wrap`` put on ``model`` (None if it is not wrapped)."""
    base = getattr(model, "model", None)
    chain = getattr(vars(base).get("forward"), "chain", None) if isinstance(base, nn.Module) else None
    for hook in getattr(chain, "hooks", ()):
        if isinstance(hook, _ModelHook):
            return hook.routers
    return None


def _decoder_layers(model: Any) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{_OWNER}: {type(model).__name__} has no decoder layers at model.model.layers; supported: "
                        "transformers causal LMs laid out like Llama, Qwen2 and Mistral")
    return layers


def _ours(module: nn.Module) -> bool:
    """Whether a Mixture-of-Depths hook is on ``module.forward``."""
    if "forward" not in hooked_methods(module):
        return False
    chain = getattr(vars(module).get("forward"), "chain", None)
    return any(isinstance(hook, (_LayerHook, _ModelHook)) for hook in getattr(chain, "hooks", ()))


def _check_layers(layers: Any, count: int) -> list:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise TypeError(f"{_OWNER}: layers must be a non-empty list of layer indices in [0, {count}); "
                        f"got {type(layers).__name__}")
    chosen = [check_int(_OWNER, "layers", i, 0, f"a list of ints in [0, {count})") for i in layers]
    for i in chosen:
        if i >= count:
            raise ValueError(f"{_OWNER}: layers must be ints in [0, {count}) (the model's decoder layers); got {i}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{_OWNER}: layers must not repeat; got {list(layers)}")
    return chosen


def wrap(model: nn.Module, layers: Sequence[int], capacity: float = 0.125, *, weight: str = "router",
         decode_by: str = "predictor", routing: str = "top_k", predictor_hidden: Optional[int] = None,
         seed: int = 0) -> MoDRouters:
    """Route the tokens of ``model``'s decoder ``layers`` (indices into ``model.model.layers``) with
    Mixture of Depths; returns the routers (``MoDRouters``). Everything is checked before anything
    is hooked; an error leaves the model as it was. See the module docstring for the settings."""
    decoder = _decoder_layers(model)
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ATTENTION:
        raise TypeError(f"{_OWNER}: attention implementation {attention!r} is not supported; supported: "
                        f"{', '.join(map(repr, ATTENTION))} (attn_implementation=...)")
    chosen = _check_layers(layers, len(decoder))
    capacity = check_real(_OWNER, "capacity", capacity, lambda v: 0 < v <= 1, "a float in (0, 1]")
    settings = dict(weight=check_choice(_OWNER, "weight", weight, WEIGHTS),
                    decode_by=check_choice(_OWNER, "decode_by", decode_by, DECIDERS),
                    routing=check_choice(_OWNER, "routing", routing, ROUTINGS))
    seed = check_int(_OWNER, "seed", seed)
    hidden = int(config.hidden_size)
    if predictor_hidden is None:
        predictor_hidden = predictor_width(hidden)
    predictor_hidden = check_int(_OWNER, "predictor_hidden", predictor_hidden, 1)
    types = getattr(config, "layer_types", None)
    for i in chosen:
        kind = types[i] if types else ("sliding_attention" if getattr(config, "sliding_window", None) else
                                       "full_attention")
        if kind != "full_attention":
            raise TypeError(f"{_OWNER}: layer {i} is {kind}; supported: full-attention layers "
                            "(a Mistral-style model needs sliding_window=None)")
    if _ours(model.model) or any(_ours(decoder[i]) for i in chosen):
        raise ValueError(f"{_OWNER}: {type(model).__name__} is already wrapped by Mixture of Depths; "
                         "call remove() on its routers first")
    names = []
    for name, param in inspect.signature(type(decoder[chosen[0]]).forward).parameters.items():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and name != "self":
            names.append(name)
    if not names or names[0] != "hidden_states":
        raise TypeError(f"{_OWNER}: {type(decoder[chosen[0]]).__name__}.forward does not take hidden_states first; "
                        "supported: transformers decoder layers (Llama, Qwen2, Mistral)")

    reference = next(decoder[chosen[0]].parameters())
    routers = MoDRouters(chosen, hidden, predictor_hidden, seed).to(device=reference.device, dtype=reference.dtype)
    routers.capacity = capacity
    for key, value in settings.items():
        setattr(routers, key, value)
    routers._attention = attention
    try:
        routers._hooks.add(model.model, _ModelHook(routers))
        for i in chosen:
            routers._hooks.add(decoder[i], _LayerHook(routers, i, names))
    except BaseException:
        routers._hooks.remove_all()
        raise
    return routers


def save_routers(routers: MoDRouters, path: Any) -> None:
    """Write the routers' parameters to a safetensors file (with their layers in the metadata)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in routers.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "layers": ",".join(map(str, routers.layers))})


def load_routers(routers: MoDRouters, path: Any) -> MoDRouters:
    """Load parameters saved by ``save_routers`` into ``routers`` (same layers; their device/dtype kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        layers = (handle.metadata() or {}).get("layers")
    if layers is not None and layers != ",".join(map(str, routers.layers)):
        raise ValueError(f"mod.load_routers: {path} holds routers for layers [{layers}]; these are for "
                         f"{list(routers.layers)}")
    routers.load_state_dict(load_file(str(path)))
    return routers
