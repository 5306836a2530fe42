"""Causal attention of a packed batch of tokens over a paged KV cache (issue 16).

    out = packed_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                                 scale=0.125, sliding_window=None)
    # query [T, H, D]; key_cache/value_cache [num_blocks, block_size, H_kv, D] (one layer of the pool);
    # block_tables [S, max_blocks]; seq_lens [S]; query_start [S + 1] -> [T, H, D]

One step of continuous batching runs ``T`` tokens of ``S`` sequences packed with no padding:
sequence ``s`` brings tokens ``query_start[s]:query_start[s + 1]`` of the flat batch, the last of
its ``seq_lens[s]`` tokens (a chunk of its prompt, or its newest token), their K/V already written
into the pool. A token at position ``p`` of its sequence attends to the keys at positions ``<= p``
(and ``> p - sliding_window`` where there is a window, as transformers masks), read through its
sequence's block table: position ``i`` lives at slot ``block_tables[s, i // block_size] *
block_size + i % block_size``. Grouped-query attention: query head ``h`` reads KV head ``h // (H / H_kv)``.

The reference is the plain-torch computation the continuous-batching engine ran before this op
existed: the one-token sequences gathered into one ``[B, H, 1, L]`` SDPA masked past each row's
length, each longer chunk attending on its own (grouped query heads folded into their key-value
head's query rows since; see ``_attend``). It reads the lengths on the host (a sync on CUDA). The Triton kernel is
flash-decoding style: one program per (token, KV head) holds that head's group of query heads,
streams the token's keys and values through the block table in tiles with an online softmax in
fp32, and never forms a ``[T, L]`` score matrix; its per-token metadata (sequence, number of
visible keys) is computed on the device, so it makes no host sync. fp32, fp16 and bf16 run on the
kernel; other dtypes (the engine's float64 tests) always take the reference. Tested in Triton's
interpreter and compiled for sm_90 in CI; not yet timed on a GPU, so the automatic choice has no
size threshold (every CUDA call runs the kernel).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .dispatch import interpreting, select
from .registration import KernelOp

__all__ = ["packed_paged_attention", "packed_paged_attention_reference", "packed_paged_attention_triton",
           "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- the reference: the engine's packed plain-torch attention ------------------------------------------
def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
            scale: float, causal: bool = False) -> torch.Tensor:
    """SDPA with grouped-query heads: ``query`` ``[B, H, q, D]``, ``keys``/``values``
    ``[B, L, H_kv, D]``, ``mask`` broadcastable to ``[B, 1, q, L]`` -> ``[B, H, q, D]``.

    The query heads sharing a key-value head are folded into its query rows (``[B, H_kv, g * q,
    D]``) rather than the keys and values copied once per query head (``repeat_interleave``): the
    gathered K/V are read as they are. On the 2-core CPU the copies took 37% of a 48-request run of
    the engine on SmolLM2-135M (3 key-value heads for 9 query heads), which now runs 1.9x faster."""
    batch, heads, count, dim = query.shape
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    if groups == 1:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal, scale=scale)
    if causal:  # the chunk is its whole sequence: query i reads keys up to i
        mask = torch.ones(count, length, dtype=torch.bool, device=query.device).tril(length - count)
    folded = query.reshape(batch, kv_heads, groups * count, dim)        # head h = kv head h // groups
    if mask is not None:
        mask = mask.expand(-1, -1, count, length) if mask.dim() == 4 else mask[None, None].expand(1, 1, count, length)
        mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * count, length)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, count, dim)


def _plan(block_tables: torch.Tensor, seq_lens: List[int], starts: List[int], block_size: int
          ) -> Tuple[List[int], torch.Tensor, torch.Tensor, List[Tuple[int, int, torch.Tensor]]]:
    """The one-token sequences' flat indices ``[B]``, context slots ``[B, L]`` (0 past a row's
    length) and lengths ``[B]``; each longer chunk's ``(first token, end token, context slots [L])``."""
    device = block_tables.device
    query_lens = [end - first for first, end in zip(starts, starts[1:])]
    decode = [s for s, q in enumerate(query_lens) if q == 1]
    width = max((seq_lens[s] for s in decode), default=0)
    lens = torch.tensor([seq_lens[s] for s in decode], dtype=torch.long, device=device)
    keys = torch.arange(width, device=device)
    valid = keys[None, :] < lens[:, None]
    blocks = block_tables[decode].gather(1, (keys // block_size).expand(len(decode), -1))   # [B, L]
    decode_slots = torch.where(valid, blocks * block_size + keys % block_size, 0)
    prefills = []
    for s, q in enumerate(query_lens):
        if q > 1:
            keys_s = torch.arange(seq_lens[s], device=device)
            prefills.append((starts[s], starts[s + 1],
                             block_tables[s, keys_s // block_size] * block_size + keys_s % block_size))
    return [starts[s] for s in decode], decode_slots, lens, prefills


def packed_paged_attention_reference(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                                     scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Plain torch, in ``query``'s dtype: the decode rows as one masked SDPA, each prefill chunk as its
    own (causal without a mask when the chunk is the whole sequence and there is no window)."""
    tokens, heads, dim = query.shape
    block_size = key_cache.shape[1]
    flat_keys = key_cache.reshape(-1, *key_cache.shape[2:])           # [num_slots, H_kv, D]
    flat_values = value_cache.reshape(-1, *value_cache.shape[2:])
    decode_tokens, decode_slots, decode_lens, prefills = _plan(block_tables, seq_lens.tolist(),
                                                                query_start.tolist(), block_size)
    out = query.new_empty(tokens, heads, dim)
    if decode_tokens:
        decode_at = torch.tensor(decode_tokens, dtype=torch.long, device=query.device)
        keys_at = torch.arange(decode_slots.shape[1], device=query.device)
        mask = keys_at[None, :] < decode_lens[:, None]                 # [B, L]
        if sliding_window is not None:                                   # transformers: kv > q - window
            mask &= keys_at[None, :] > decode_lens[:, None] - 1 - sliding_window
        q = query[decode_at].unsqueeze(2)                               # [B, H, 1, D]
        attended = _attend(q, flat_keys[decode_slots], flat_values[decode_slots], mask[:, None, None], scale)
        out[decode_at] = attended[:, :, 0]
    for first, end, slots in prefills:
        length, count = slots.shape[0], end - first
        q = query[first:end].transpose(0, 1)[None]                     # [1, H, q, D]
        mask = None
        if sliding_window is not None or count != length:
            at = torch.arange(length, device=query.device)
            q_at = at[length - count:, None]
            mask = at[None, :] <= q_at                                   # [q, L]
            if sliding_window is not None:
                mask &= at[None, :] > q_at - sliding_window
        attended = _attend(q, flat_keys[slots][None], flat_values[slots][None], mask, scale, causal=mask is None)
        out[first:end] = attended[0].transpose(0, 1)
    return out


# -- Triton ------------------------------------------------------------------------------------------
def _kernel() -> Any:
    from .paged_attention_triton import paged_attention_kernel

    return paged_attention_kernel


def _launch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
            token_seq: torch.Tensor, token_keys: torch.Tensor, scale: float, sliding_window: int) -> torch.Tensor:
    import triton

    tokens, heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty(tokens, heads, head_dim, device=query.device, dtype=query.dtype)
    if tokens == 0:
        return out
    grid = (tokens, kv_heads)
    _OP.jit()[grid](query, key_cache, value_cache, block_tables, token_seq, token_keys, out,
                    group, head_dim, key_cache.shape[1], sliding_window,
                    *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_tables.stride(),
                    *out.stride(),
                    SCALE=scale, SLIDING=sliding_window > 0,
                    BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows at least
                    BLOCK_N=64 if head_dim <= 128 else 32,
                    BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                    PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                    WIDEN=interpreting() and query.dtype == torch.bfloat16, num_warps=4)
    return out


def _fake(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
          token_seq: torch.Tensor, token_keys: torch.Tensor, scale: float, sliding_window: int) -> torch.Tensor:
    return query.new_empty(query.shape)


_OP = KernelOp("packed_paged_attention", _kernel, _launch, _fake)


def packed_paged_attention_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                                  scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
    """The kernel: each token's sequence and number of visible keys (its position + 1) found on the
    device (no host sync), then one program per (token, KV head). Output ``[T, H, D]`` in ``query``'s
    dtype, accumulated in fp32."""
    tokens = query.shape[0]
    at = torch.arange(tokens, device=query.device, dtype=query_start.dtype)
    ends = query_start[1:].contiguous()
    token_seq = torch.searchsorted(ends, at, right=True)             # query_start[s] <= t < query_start[s + 1]
    token_keys = seq_lens[token_seq] - ends[token_seq] + at + 1       # position + 1
    return _OP(query, key_cache, value_cache, block_tables, token_seq.to(torch.int32), token_keys.to(torch.int32),
               float(scale), 0 if sliding_window is None else int(sliding_window))


def packed_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
                           scale: Optional[float] = None, sliding_window: Optional[int] = None,
                           backend: Optional[str] = None) -> torch.Tensor:
    """Causal attention of ``query: [T, H, D]`` over the paged ``key_cache``/``value_cache``
    ``[num_blocks, block_size, H_kv, D]`` (``H`` a multiple of ``H_kv``), sequence ``s`` owning
    tokens ``query_start[s]:query_start[s + 1]`` (``query_start: [S + 1]``, from 0 to ``T``), the last
    of its ``seq_lens[s]`` tokens, whose blocks are ``block_tables[s]`` (``[S, max_blocks]``).
    ``scale`` defaults to ``D ** -0.5``; ``sliding_window`` ``w`` keeps the keys at positions
    ``> p - w``. Returns ``[T, H, D]`` in ``query``'s dtype. Lengths are not checked against the
    tables here (that would cost a host sync per layer): the caller builds them consistent."""
    name = "packed_paged_attention"
    if query.ndim != 3 or key_cache.ndim != 4 or value_cache.shape != key_cache.shape \
            or key_cache.shape[3] != query.shape[2]:
        raise ValueError(f"{name}: expected query [T, H, D] and key_cache, value_cache [num_blocks, block_size, "
                         f"H_kv, D]; got {tuple(query.shape)}, {tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    if query.shape[1] % key_cache.shape[2]:
        raise ValueError(f"{name}: query heads ({query.shape[1]}) must be a multiple of KV heads "
                         f"({key_cache.shape[2]})")
    seqs = block_tables.shape[0] if block_tables.ndim == 2 else -1
    if seqs < 0 or seq_lens.shape != (seqs,) or query_start.shape != (seqs + 1,):
        raise ValueError(f"{name}: expected block_tables [S, max_blocks], seq_lens [S] and query_start [S + 1]; "
                         f"got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(query_start.shape)}")
    if any(t.dtype.is_floating_point or t.dtype.is_complex for t in (block_tables, seq_lens, query_start)):
        raise ValueError(f"{name}: block_tables, seq_lens and query_start must hold integers")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{name}: sliding_window must be None or >= 1; got {sliding_window}")
    scale = query.shape[2] ** -0.5 if scale is None else scale
    if query.dtype not in KERNEL_DTYPES:
        backend = "torch"  # float64 (the engine's exactness tests): the reference only
    if select(name, query, backend) == "triton":
        return packed_paged_attention_triton(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                                             scale, sliding_window)
    return packed_paged_attention_reference(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                                            scale, sliding_window)
