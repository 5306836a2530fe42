"""Attention over the paged KV cache for a packed batch, and the binding that gives an unmodified
transformers causal LM this attention through transformers' attention registry.

One forward runs ``T`` tokens of ``S`` sequences packed as one flat sequence ``[1, T]``, with no
padding: each sequence brings a chunk of its prompt (prefill) or its newest token (decode). Every
layer first writes the ``T`` new keys and values into the pool at the slots the manager handed out
(``slot_mapping``), then each sequence's queries attend over the K/V its block table points at,
causally: a query at position ``p`` sees keys at positions ``<= p`` (and ``> p - window`` in a
sliding-window layer). Writing the whole step before reading is what lets two sequences admitted in
the same step share prefix blocks that this very step computes.

    binding = PagedAttentionBinding(model, pool)      # registers the function, changes nothing yet
    with binding.active(PagedBatch.build(...)):       # the model's attention reads/writes the pool
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    binding.close()                                   # the registration undone

The model is switched to the paged attention only inside ``active`` (its configs'
``_attn_implementation`` set to the registered name and put back after, even on error), so between
steps it is exactly the model the user had. transformers builds no mask for a name it has no mask
function for, and each layer's attention receives ``module`` (hence ``module.layer_idx``) and the
layer's ``sliding_window``.

The attention itself is ``accel.kernels.packed_paged_attention``: a Triton kernel reading K/V
through the block tables for CUDA tensors, and on the CPU its plain-torch reference (one-token
sequences gathered into one ``[B, H, 1, L]`` batch masked past each row's length, each longer chunk
attending on its own), which is what ran here before the kernel existed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import uuid
import weakref
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import kernels
from .paged_kv import BlockPool

__all__ = ["PagedBatch", "paged_attention", "PagedAttentionBinding", "kv_layout"]


@dataclasses.dataclass
class PagedBatch:
    """One forward's packed tokens, as the attention reads them (every tensor on the pool's device).

    ``slot_mapping``: ``[T]`` where each token's K/V is written; ``positions``: ``[T]`` each token's
    position in its sequence; ``block_tables``: ``[S, max_blocks]`` the sequences' pages;
    ``seq_lens``: ``[S]`` each sequence's length after this step; ``query_start``: ``[S + 1]``,
    sequence ``s``'s new tokens being ``query_start[s]:query_start[s + 1]`` of the flat batch (the
    last of its ``seq_lens[s]``)."""

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: Sequence[int],
              query_lens: Sequence[int], block_size: int) -> "PagedBatch":
        """From the manager's ``slot_mapping`` ``[T]`` (the sequences' new tokens, in order), its
        ``block_tables`` ``[S, max_blocks]``, each sequence's length after this step (``seq_lens``)
        and its number of new tokens (``query_lens``, summing to ``T``)."""
        device = block_tables.device
        if len(seq_lens) != block_tables.shape[0] or len(query_lens) != len(seq_lens):
            raise ValueError(f"PagedBatch: block_tables, seq_lens and query_lens must describe the same sequences; "
                             f"got {block_tables.shape[0]}, {len(seq_lens)} and {len(query_lens)}")
        if sum(query_lens) != slot_mapping.shape[0] or any(not 1 <= q <= n for q, n in zip(query_lens, seq_lens)):
            raise ValueError(f"PagedBatch: need 1 <= query_len <= seq_len per sequence and sum(query_lens) == "
                             f"{slot_mapping.shape[0]} (the slots); got {list(query_lens)} and {list(seq_lens)}")
        if any(n > block_tables.shape[1] * block_size for n in seq_lens):
            raise ValueError(f"PagedBatch: a sequence holds more tokens than its block table's "
                             f"{block_tables.shape[1]} blocks of {block_size}; got seq_lens {list(seq_lens)}")
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        positions = torch.cat([torch.arange(n - q, n, device=device) for q, n in zip(query_lens, seq_lens)]) \
            if seq_lens else torch.zeros(0, dtype=torch.long, device=device)
        return cls(slot_mapping, positions, block_tables,
                   torch.tensor(list(seq_lens), dtype=torch.long, device=device),
                   torch.tensor(starts, dtype=torch.long, device=device))


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: PagedBatch,
                    scale: Optional[float] = None, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of a packed batch's queries over its sequences' pages. ``query``:
    ``[T, H, D]``; ``key_cache``/``value_cache``: one layer of the pool ``[num_blocks, block_size,
    H_kv, D]``, this step's K/V already written. Returns ``[T, H, D]``. The kernels' dispatcher
    chooses: the Triton kernel for CUDA tensors, the plain-torch reference otherwise."""
    return kernels.packed_paged_attention(query, key_cache, value_cache, batch.block_tables, batch.seq_lens,
                                          batch.query_start, scale=scale, sliding_window=sliding_window)


# -- the transformers binding ----------------------------------------------------------------------------
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def kv_layout(model: Any, owner: str = "PagedAttentionBinding") -> Tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers causal LM whose attention can be
    switched through transformers' ``AttentionInterface``; ``TypeError`` naming what is supported
    otherwise. Reads the model, changes nothing."""
    supported = ("a transformers causal LM whose attention layers call transformers' AttentionInterface "
                 "(Llama, Qwen2, Mistral and alike)")
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"{owner}: model must be {supported}; got {type(model).__name__}")
    name, config = type(model).__name__, model.config
    if getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise TypeError(f"{owner}: model must be {supported}; {name} is not a decoder-only LM with an output head")
    if not hasattr(config, "_attn_implementation_internal") or not type(model)._can_set_attn_implementation():
        raise TypeError(f"{owner}: model must be {supported}; {name} does not dispatch its attention through "
                        "the AttentionInterface")
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(_SUPPORTED_LAYER_TYPES))
    if other:
        raise TypeError(f"{owner}: model must be {supported}; {name} has layers of type {', '.join(other)}")
    layers = getattr(config, "num_hidden_layers", None)
    found = sorted(m.layer_idx for m in model.modules()
                   if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int))
    if not layers or found != list(range(layers)):
        raise TypeError(f"{owner}: model must be {supported}; {name} has no attention module with a layer_idx "
                        f"for each of its {layers} layers (found {found})")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class _PagedAttentionFunction:
    """What transformers' registry holds: the attention function of ``PagedAttentionBinding``,
    with the step's batch (None outside ``active``) and the layers that called it this step."""

    def __init__(self, pool: BlockPool, name: str) -> None:
        self.pool, self.name = pool, name
        self.batch: Optional[PagedBatch] = None
        self.calls: List[int] = []

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any = None, scaling: Optional[float] = None, dropout: float = 0.0,
                 sliding_window: Optional[int] = None, **kwargs: Any) -> Tuple[torch.Tensor, None]:
        batch = self.batch
        if batch is None:
            raise RuntimeError(f"attention implementation {self.name!r} is the paged KV cache's and runs only inside "
                               "its engine's step; set the model's attention implementation back to use it alone")
        for option in ("softcap", "s_aux"):
            if kwargs.get(option) is not None:
                raise NotImplementedError(f"paged attention: {option} (in {type(module).__name__}) is not supported")
        layer = module.layer_idx
        if query.shape[0] != 1 or query.shape[2] != batch.num_tokens:
            raise ValueError(f"paged attention: expected the packed batch's query [1, H, {batch.num_tokens}, D]; "
                             f"got {list(query.shape)}")
        self.calls.append(layer)
        self.pool.write(layer, batch.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))
        out = paged_attention(query[0].transpose(0, 1), self.pool.key_cache[layer], self.pool.value_cache[layer],
                              batch, scaling, sliding_window)
        return out.unsqueeze(0), None                                   # [1, T, H, D], as transformers' functions


def _unregister(name: str) -> None:
    from transformers import AttentionInterface

    # The registry has no public removal; its class-wide mapping is where register() put it.
    AttentionInterface._global_mapping.pop(name, None)


class PagedAttentionBinding:
    """A transformers causal LM's attention reading and writing ``pool`` while ``active``.

    Construction checks the model (``kv_layout``) and the pool's shape, dtype and device against it,
    then registers the attention function under a name of its own; the model itself is not changed.
    ``close()`` (or garbage collection) removes the registration."""

    def __init__(self, model: Any, pool: BlockPool) -> None:
        layers, kv_heads, head_dim = kv_layout(model, "PagedAttentionBinding")
        if not isinstance(pool, BlockPool):
            raise TypeError(f"PagedAttentionBinding: pool must be a BlockPool; got {type(pool).__name__}")
        want = (layers, kv_heads, head_dim, model.dtype, model.device)
        have = (pool.key_cache.shape[0], *pool.key_cache.shape[3:], pool.key_cache.dtype, pool.key_cache.device)
        if want != have:
            raise ValueError(f"PagedAttentionBinding: the pool's (layers, kv_heads, head_dim, dtype, device) must be "
                             f"the model's {want}; got {have}")
        import transformers

        self.num_layers = layers
        self.name = f"accel_paged_{uuid.uuid4().hex[:12]}"
        self._configs = list({id(m.config): m.config for m in model.modules()
                              if isinstance(m, transformers.PreTrainedModel)}.values())
        self._function = _PagedAttentionFunction(pool, self.name)
        transformers.AttentionInterface.register(self.name, self._function)
        self._finalizer = weakref.finalize(self, _unregister, self.name)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @contextlib.contextmanager
    def active(self, batch: PagedBatch) -> Iterator[None]:
        """The model's attention is this binding's, over ``batch``, for the block's duration; every
        layer must have run it exactly once when the block ends (a model whose layers bypass the
        registry would otherwise be computed wrong without a sound)."""
        if self.closed:
            raise RuntimeError("PagedAttentionBinding: closed")
        saved = [(config, config._attn_implementation_internal) for config in self._configs]
        self._function.batch, self._function.calls = batch, []
        try:
            for config, _ in saved:
                config._attn_implementation_internal = self.name
            yield
        finally:
            for config, implementation in saved:
                config._attn_implementation_internal = implementation
            self._function.batch = None
        if sorted(self._function.calls) != list(range(self.num_layers)):
            raise RuntimeError(f"PagedAttentionBinding: each of the {self.num_layers} layers must run the paged "
                               f"attention once per forward; the layers that did: {sorted(self._function.calls)}")

    def close(self) -> None:
        """Remove the registration (idempotent). The model is not touched: it only ever changes inside
        ``active``."""
        self._finalizer()
