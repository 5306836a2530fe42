"""Mixture of Depths, the tensor side: run a block on some tokens only, and remember their keys.

Tensor helpers for ``accel.llm.mod`` (transformers is imported only to check a cache's type). A
block sees a *compacted*
sequence: the chosen tokens of each row in their original order, ``[B, K, C]``; rows that chose
fewer than ``K`` are filled with *holes* (``hole[b, i]``), whose outputs are dropped and whose keys
no real token attends to.

    idx = top_k_indices(scores, k)                  # scores [B, T] -> [B, k], ascending (original order)
    idx, hole = chosen_indices(chosen)              # chosen [B, T] bool -> [B, K] ascending, holes (= T) last
    xs = gather_tokens(x, idx)                      # x [B or 1, T, ...] -> [B, K, ...]
    y = scatter_tokens(x, idx, new, hole)           # x with its rows idx replaced by new [B, K, C]
    ok = token_validity(mask, offset, batch)        # [B, T]: the token attends to itself (is not padding)
    m = compact_mask(mask, rows, cols, ...)         # the model's 4D mask at the kept queries and keys
    kv = LayerKV()                                  # one layer's own KV cache: the tokens it ran on only
    kv = caches.get(cache, layer, slot, batch)      # LayerCaches: those caches, per cache object given
    mark_shared(cache, slot, x, kv)                 # the shared cache's placeholder for a wrapped layer

Masks follow transformers: ``[B or 1, H or 1, q, kv]``, bool (True: attend; sdpa) or additive
float (0 / dtype min; eager). A mask's key column ``j`` is the ``j``-th token of the sequence the
shared cache has seen (its *slot*), so gathering rows and columns of the model's own mask keeps its
causality and padding exactly; a missing mask (sdpa without padding) is rebuilt as causal by slot.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["top_k_indices", "chosen_indices", "gather_tokens", "scatter_tokens", "token_validity",
           "compact_mask", "LayerKV", "LayerCaches", "check_cache", "mark_shared"]


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best tokens of each row, in their original order: scores [B, T] -> [B, k] (long)."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def chosen_indices(chosen: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """chosen [B, T] bool -> (idx [B, K], hole [B, K]) with K the largest count of a row: each row's
    chosen tokens ascending, then holes (index T). One host sync (K is a shape)."""
    T = chosen.shape[1]
    order = torch.arange(T, device=chosen.device).expand_as(chosen)
    key = torch.where(chosen, order, torch.full_like(order, T))
    K = int(chosen.sum(dim=1).max()) if chosen.numel() else 0
    idx = key.sort(dim=1).values[:, :K]
    return idx, idx == T


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B or 1, T, ...] at idx [B, K] (holes clamped to a real token) -> [B, K, ...]."""
    B, K = idx.shape
    x = x.expand(B, *x.shape[1:])
    rows = idx.clamp(max=x.shape[1] - 1).view(B, K, *([1] * (x.dim() - 2)))
    return x.gather(1, rows.expand(B, K, *x.shape[2:]))


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, new: torch.Tensor,
                   hole: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, T, C] with rows idx [B, K] replaced by new [B, K, C]; the other rows are copied bit for
    bit. Holes (index T) land in one extra row that is dropped."""
    index = idx.unsqueeze(-1).expand_as(new)
    if hole is None:
        return x.scatter(1, index, new)
    T = x.shape[1]
    return torch.cat([x, x[:, :1]], dim=1).scatter(1, index, new)[:, :T].contiguous()


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min


def token_validity(mask: Optional[torch.Tensor], offset: int, batch: int) -> Optional[torch.Tensor]:
    """[B, T] bool: a token of the current chunk may attend to itself, i.e. is not padding (a causal
    mask always lets a real token see itself). ``offset``: the slot of the chunk's first token.
    None when there is no mask (nothing is padding)."""
    if mask is None:
        return None
    T = mask.shape[2]
    diagonal = mask[:, 0, :, offset:offset + T].diagonal(dim1=-2, dim2=-1)
    return _allowed(diagonal).expand(batch, T)


def compact_mask(mask: Optional[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor, q_slots: torch.Tensor,
                 col_ok: Optional[torch.Tensor] = None, hole: Optional[torch.Tensor] = None,
                 float_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The attention mask of a compacted sequence: [B, H, K, L].

    mask: the model's 4D mask [B or 1, H, q, kv] or None (causal, no padding); rows [B, K]: each
    kept query's row in it; cols [B, L]: each key's column (slot), the last K of them the kept
    queries' own; q_slots [B, K]: the queries' slots (to rebuild a missing mask); col_ok [B, L]:
    False for a hole's key; hole [B, K]: a hole query attends to its own key only (no empty row).
    Bool out, or additive float (``float_dtype``, or the mask's float dtype)."""
    B, K = rows.shape
    L = cols.shape[1]
    if mask is None:
        allowed = (cols[:, None, :] <= q_slots[:, :, None]).unsqueeze(1)
        values = None
    else:
        full = mask.expand(B, *mask.shape[1:])
        H, kv = full.shape[1], full.shape[3]
        picked = full.gather(2, rows[:, None, :, None].expand(B, H, K, kv))
        values = picked.gather(3, cols[:, None, None, :].expand(B, H, K, L))
        allowed = _allowed(values)
        if values.dtype == torch.bool:
            values = None
        else:
            float_dtype = values.dtype
    if col_ok is not None:
        allowed = allowed & col_ok[:, None, None, :]
    own = None
    if hole is not None:
        own = torch.zeros(B, 1, K, L, dtype=torch.bool, device=rows.device)
        own[..., L - K:] = torch.eye(K, dtype=torch.bool, device=rows.device) & hole[:, None, :, None]
        allowed = allowed | own
    if float_dtype is None:
        return allowed
    base = torch.zeros((), dtype=float_dtype, device=rows.device) if values is None else values
    if own is not None and values is not None:
        base = base.masked_fill(own, 0.0)
    return torch.where(allowed, base, torch.finfo(float_dtype).min)


class LayerKV:
    """One wrapped layer's own KV cache: the keys and values of the tokens it ran on, nothing else.

    keys, values: [B, H_kv, L, D]; slots [B, L]: each entry's slot (its column in the model's mask);
    ok [B, L]: False for a hole (at batch > 1, a row that did not choose a token another row chose);
    seen: how many tokens of the sequence were routed (chosen or not); marker: the shared cache's
    placeholder tensor for this layer after the last step (a reorder or crop elsewhere replaces it).
    The attention module calls ``update`` as it would a transformers ``Cache``; the slots and holes
    of the step are handed over before (``pending``)."""

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.slots: Optional[torch.Tensor] = None
        self.ok: Optional[torch.Tensor] = None
        self.seen = 0
        self.marker: Optional[torch.Tensor] = None
        self.pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def past(self, batch: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slots [B, L], ok [B, L]) of the entries so far (empty before the first)."""
        if self.slots is None:
            return (torch.zeros(batch, 0, dtype=torch.long, device=device),
                    torch.zeros(batch, 0, dtype=torch.bool, device=device))
        return self.slots, self.ok

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.pending is None:
            raise RuntimeError("mod.LayerKV: update without the slots of the step (called outside its layer)")
        slots, ok = self.pending
        self.pending = None
        if self.keys is None:
            self.keys, self.values, self.slots, self.ok = key_states, value_states, slots, ok
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.slots = torch.cat([self.slots, slots], dim=1)
            self.ok = torch.cat([self.ok, ok], dim=1)
        return self.keys, self.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return len(self)


class LayerCaches:
    """The wrapped layers' own caches, per cache object the caller gave (held weakly: a new
    ``generate`` makes a new cache, hence fresh layer caches; a dropped one frees them)."""

    def __init__(self) -> None:
        self._by_cache: "weakref.WeakKeyDictionary[Any, Dict[int, LayerKV]]" = weakref.WeakKeyDictionary()

    def __getstate__(self) -> Dict[str, Any]:  # a copy or a pickle starts with no caches
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()

    def find(self, cache: Any, layer: int) -> Optional[LayerKV]:
        return self._by_cache.get(cache, {}).get(layer)

    def get(self, cache: Any, layer: int, slot: int, batch: int) -> LayerKV:
        """Layer ``layer``'s cache for ``cache`` (whose entry ``slot`` is the layer's placeholder),
        checked against it: a cache reset starts again, one changed otherwise is refused."""
        store = self._by_cache.setdefault(cache, {})
        kv = store.get(layer)
        shared = cache.layers[slot].keys if slot < len(cache.layers) else None
        length = cache.get_seq_length(slot)
        if kv is None or (shared is not kv.marker and length == 0):
            if length != 0:
                raise RuntimeError(f"mod: the cache given already holds {length} tokens that layer {layer} did not "
                                   "route causally (filled by a forward without a cache given, or before wrap); "
                                   "start decoding from an empty cache")
            kv = store[layer] = LayerKV()
        elif shared is not kv.marker:
            raise RuntimeError(f"mod: layer {layer}'s entry in the cache was changed outside a forward (reordered or "
                               "cropped: beam search, assisted decoding); Mixture-of-Depths decoding does not follow it")
        elif kv.keys is not None and kv.keys.shape[0] != batch:
            raise RuntimeError(f"mod: batch {batch} does not match the cache's {kv.keys.shape[0]}")
        return kv


def check_cache(cache: Any, slot: int) -> None:
    """``TypeError`` unless ``cache`` is a ``DynamicCache`` whose entry ``slot`` is full attention."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise TypeError(f"mod: decoding supports transformers' DynamicCache (generate's default); got {type(cache).__name__}")
    if slot < len(cache.layers) and type(cache.layers[slot]) is not DynamicLayer:
        raise TypeError(f"mod: the cache's layer {slot} is a {type(cache.layers[slot]).__name__}; "
                        "supported: DynamicLayer (full attention)")


def mark_shared(cache: Any, slot: int, x: torch.Tensor, kv: Optional[LayerKV]) -> None:
    """One number per token of x [B, T, C] in the shared cache's entry ``slot`` (a wrapped layer's):
    its length, which sets positions and mask sizes, stays the sequence's, at no real memory."""
    B, T = x.shape[:2]
    marker = x.new_zeros(B, 1, T, 1)
    cache.update(marker, marker, slot)
    if kv is not None:
        kv.seen += T
        kv.marker = cache.layers[slot].keys
