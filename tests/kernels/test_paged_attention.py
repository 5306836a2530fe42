"""accel.kernels.packed_paged_attention: the Triton kernel (in Triton's CPU interpreter) against the
reference and against dense SDPA per sequence, over steps that mix decode tokens with prefill chunks
on block tables handed out from a shuffled pool; the dispatcher's choices; the engine's attention
going through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import accel.kernels as kernels
from accel.kernels.paged_attention import packed_paged_attention_reference, packed_paged_attention_triton

pytestmark = pytest.mark.usefixtures("one_thread")

GARBAGE = 50.0  # what the pool holds outside the step's sequences: a read past a bound shows at once


def paged_step(seqs, heads, kv_heads, dim, block_size=4, dtype=torch.float32, seed=0, spare=3):
    """A step of ``seqs`` = ``[(seq_len, query_len), ...]``: each sequence's K/V written into blocks
    taken from a shuffled pool (so no table is contiguous), every other slot garbage, tables padded
    with a garbage block. Returns the op's arguments and each sequence's dense ``(keys, values)``
    ``[n, H_kv, D]``."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n, _ in seqs]
    num_blocks = sum(need) + spare
    order = torch.randperm(num_blocks, generator=g).tolist()
    key_cache = GARBAGE * torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    value_cache = GARBAGE * torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    tables, dense, taken = [], [], 0
    for (n, _), blocks in zip(seqs, need):
        table = order[taken:taken + blocks]
        taken += blocks
        keys, values = torch.randn(2, n, kv_heads, dim, generator=g)
        at = torch.arange(n)
        slots = torch.tensor(table)[at // block_size] * block_size + at % block_size
        key_cache.view(-1, kv_heads, dim)[slots] = keys
        value_cache.view(-1, kv_heads, dim)[slots] = values
        tables.append(table)
        dense.append((keys.to(dtype), values.to(dtype)))
    pad = order[-1]  # a spare block: garbage
    width = max(need)
    block_tables = torch.tensor([t + [pad] * (width - len(t)) for t in tables])
    query_lens = [q for _, q in seqs]
    query = torch.randn(sum(query_lens), heads, dim, generator=g).to(dtype)
    query_start = torch.tensor([0] + query_lens).cumsum(0)
    seq_lens = torch.tensor([n for n, _ in seqs])
    args = (query, key_cache.to(dtype), value_cache.to(dtype), block_tables, seq_lens, query_start)
    return args, dense


def dense_attention(query, seqs, dense, scale, window=None):
    """Per sequence, float64 SDPA over its own keys in order (GQA by repeating the KV heads), the
    chunk's queries at the last positions, a boolean causal (and window) mask."""
    out, start = [], 0
    for (n, count), (keys, values) in zip(seqs, dense):
        groups = query.shape[1] // keys.shape[1]
        k, v = (t.double().transpose(0, 1).repeat_interleave(groups, dim=0)[None] for t in (keys, values))
        at = torch.arange(n)
        q_at = at[n - count:, None]
        mask = at[None, :] <= q_at
        if window is not None:
            mask &= at[None, :] > q_at - window
        q = query[start:start + count].double().transpose(0, 1)[None]
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1))
        start += count
    return torch.cat(out)


# Block size 4: sequences of 11 (not a multiple) and 4 (one block exactly) and 1 key decoding, a
# prefill chunk of 5 after 6 earlier tokens (causal within the chunk), a whole prompt of 8.
MIXED = [(11, 1), (11, 5), (1, 1), (8, 8), (4, 1)]


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dim", [16, 32])
def test_the_kernel_equals_the_reference_and_dense_attention_in_fp32(dim, heads, kv_heads, window):
    args, dense = paged_step(MIXED, heads, kv_heads, dim, seed=dim + kv_heads)
    out = packed_paged_attention_triton(*args, 0.3, window)
    assert out.shape == args[0].shape and out.dtype == torch.float32
    reference = packed_paged_attention_reference(*args, 0.3, window)
    exact = dense_attention(args[0], MIXED, dense, 0.3, window)
    # fp32 products and an online softmax: another summation order than SDPA's
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 70])
def test_long_sequences_stream_through_several_key_tiles(window):
    """64 keys a tile: a decode row over 150 keys (three tiles, the last partial), a chunk of 3 at
    the end of 130 keys; a 70-key window starts mid-tile and mid-block; a window of 1 sees only the
    token itself."""
    seqs = [(150, 1), (130, 3), (2, 1)]
    args, dense = paged_step(seqs, 4, 2, 16, block_size=16, seed=5)
    out = packed_paged_attention_triton(*args, 0.25, window)
    torch.testing.assert_close(out.double(), dense_attention(args[0], seqs, dense, 0.25, window), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, packed_paged_attention_reference(*args, 0.25, window), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs_accumulate_in_fp32(dtype, atol):
    """Against float64 attention of the same rounded inputs, outputs up to ~3 in size: the error is
    the output's rounding to the input dtype (and on a GPU one rounding of p before p @ v). bf16: one
    ulp at [2, 4) is 2^-6 = 0.0156, and the interpreter's fp32 -> bf16 cast truncates (a GPU rounds
    to nearest), so 2e-2; fp16: one ulp there is 2^-9, so 2e-3. The reference (SDPA in the input
    dtype on the CPU) lies within the same distance."""
    args, dense = paged_step(MIXED, 4, 2, 32, dtype=dtype, seed=11)
    for window in (None, 3):
        out = packed_paged_attention_triton(*args, 32 ** -0.5, window)
        assert out.dtype == dtype
        exact = dense_attention(args[0], MIXED, dense, 32 ** -0.5, window)
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=atol)
        reference = packed_paged_attention_reference(*args, 32 ** -0.5, window)
        torch.testing.assert_close(out.double(), reference.double(), rtol=0, atol=atol)


def test_the_dispatcher_chooses_records_and_keeps_autograd(monkeypatch):
    args, _ = paged_step(MIXED, 4, 2, 16)
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    out = kernels.packed_paged_attention(*args)
    assert kernels.last_backend("packed_paged_attention") == "torch"  # a CPU tensor: the reference, bit for bit
    assert torch.equal(out, packed_paged_attention_reference(*args, 16 ** -0.5))
    fused = kernels.packed_paged_attention(*args, backend="triton")
    assert kernels.last_backend("packed_paged_attention") == "triton"
    torch.testing.assert_close(fused, out, rtol=0, atol=1e-5)
    narrow = (*args[:3], *(t.int() for t in args[3:]))  # int32 metadata, as a GPU engine may keep it
    assert torch.equal(kernels.packed_paged_attention(*narrow, backend="triton"), fused)
    assert torch.equal(kernels.packed_paged_attention(*narrow, backend="torch"), out)
    empty = (args[0][:0], *args[1:3], args[3][:0], args[4][:0], args[5][:1])  # no sequence this step
    assert kernels.packed_paged_attention(*empty, backend="triton").shape == (0, 4, 16)
    assert kernels.packed_paged_attention(*empty, backend="torch").shape == (0, 4, 16)
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    kernels.packed_paged_attention(*args, sliding_window=2)
    assert kernels.last_backend("packed_paged_attention") == "triton"
    monkeypatch.setenv("ACCEL_KERNELS", "torch")
    kernels.packed_paged_attention(*args)
    assert kernels.last_backend("packed_paged_attention") == "torch"
    # float64 (the engine's exactness tests) and gradients go through the reference whatever was asked
    doubled = (args[0].double(), args[1].double(), args[2].double(), *args[3:])
    kernels.packed_paged_attention(*doubled, backend="triton")
    assert kernels.last_backend("packed_paged_attention") == "torch"
    query = args[0].clone().requires_grad_(True)
    kernels.packed_paged_attention(query, *args[1:], backend="triton").sum().backward()
    assert kernels.last_backend("packed_paged_attention") == "torch" and query.grad is not None


def test_bad_arguments_are_refused_by_name():
    (query, key_cache, value_cache, tables, lens, starts), _ = paged_step(MIXED, 4, 2, 16)
    with pytest.raises(ValueError, match="expected query"):
        kernels.packed_paged_attention(query[0], key_cache, value_cache, tables, lens, starts)
    with pytest.raises(ValueError, match="expected query"):
        kernels.packed_paged_attention(query, key_cache, value_cache[..., :8], tables, lens, starts)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernels.packed_paged_attention(query[:, :3], key_cache, value_cache, tables, lens, starts)
    with pytest.raises(ValueError, match=r"query_start \[S \+ 1\]"):
        kernels.packed_paged_attention(query, key_cache, value_cache, tables, lens, starts[1:])
    with pytest.raises(ValueError, match="integers"):
        kernels.packed_paged_attention(query, key_cache, value_cache, tables.float(), lens, starts)
    with pytest.raises(ValueError, match="sliding_window"):
        kernels.packed_paged_attention(query, key_cache, value_cache, tables, lens, starts, sliding_window=0)


def test_compile_traces_through_the_custom_op():
    args, _ = paged_step(MIXED, 4, 2, 16)

    def fn(*args):
        return kernels.packed_paged_attention(*args, scale=0.3, sliding_window=3, backend="triton") * 2

    eager = fn(*args)  # the first call builds the op, outside any graph
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert torch.equal(torch.compile(fn, backend="eager")(*args), eager)
    torch._dynamo.reset()


def test_the_engines_attention_goes_through_the_dispatcher(monkeypatch):
    """accel.llm's packed attention over a PagedBatch: on the CPU the reference (bit-identical to the
    kernels' reference), with ACCEL_KERNELS=triton the kernel."""
    from accel.llm.paged_attention import PagedBatch, paged_attention

    (query, key_cache, value_cache, tables, lens, starts), dense = paged_step(MIXED, 4, 2, 16, seed=3)
    slots = torch.zeros(query.shape[0], dtype=torch.long)  # where this step's K/V went: not read by attention
    batch = PagedBatch.build(slots, tables, lens.tolist(), [q for _, q in MIXED], key_cache.shape[1])
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    out = paged_attention(query, key_cache, value_cache, batch, 0.3, 3)
    assert kernels.last_backend("packed_paged_attention") == "torch"
    reference = packed_paged_attention_reference(query, key_cache, value_cache, tables, lens, starts, 0.3, 3)
    assert torch.equal(out, reference)
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    fused = paged_attention(query, key_cache, value_cache, batch, 0.3, 3)
    assert kernels.last_backend("packed_paged_attention") == "triton"
    torch.testing.assert_close(fused.double(), dense_attention(query, MIXED, dense, 0.3, 3), rtol=0, atol=1e-5)


def test_the_continuous_batching_engine_runs_on_the_kernel(monkeypatch):
    """A float32 Mistral-style model with a sliding window, served by the engine with
    ACCEL_KERNELS=triton: chunked prompts and decode steps on the kernel, the same greedy tokens as
    on the reference."""
    import transformers

    from accel.llm.batching import ContinuousBatcher

    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=5, initializer_range=0.3, bos_token_id=0, eos_token_id=None,
                                        pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    requests = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (3, 13, 1)]
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ACCEL_KERNELS", backend)
        with ContinuousBatcher(model, block_size=4, num_blocks=24, max_batch_tokens=8) as engine:
            outputs[backend] = engine.generate(requests, 5)
        assert kernels.last_backend("packed_paged_attention") == backend
    assert outputs["triton"] == outputs["torch"]
