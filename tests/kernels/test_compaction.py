"""accel.kernels.compaction: gather_tokens, scatter_tokens and compact_tokens, each Triton kernel (in
Triton's CPU interpreter) bit-equal to its torch reference (they are copies) over ragged, odd and
edge sizes; the dispatcher's choice; and A-ViT, EViT, token exit, early exit and RegionCache on the
kernels giving the same bits as on the references."""
from __future__ import annotations

import pytest
import torch

import accel
from accel.kernels import last_backend
from accel.kernels.compaction import (compact_tokens, compact_tokens_reference, compact_tokens_triton, gather_tokens,
                                      gather_tokens_reference, gather_tokens_triton, scatter_tokens,
                                      scatter_tokens_reference, scatter_tokens_triton)
from tests.conftest import images, make_vit

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = ("gather_tokens", "scatter_tokens", "compact_tokens")


def tokens(batch, n, channels, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, channels, generator=g).to(dtype), g


def picks(batch, n, k, g):
    """[B, k] distinct positions per image, in random order (as RegionCache's or EViT's choices)."""
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)]).reshape(batch, k)


# (batch, N, C, protected, K): one token, K not a multiple of the block, only the prefix (K=0),
# every token, channels over one block of 1024 (several channel programs), odd batches
GATHER = [(1, 1, 8, 0, 1), (3, 17, 24, 1, 9), (2, 9, 20, 5, 0), (5, 40, 1100, 0, 40), (1, 70, 3, 4, 66)]


@pytest.mark.parametrize("batch, n, channels, protected, k", GATHER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernel_equals_the_reference(batch, n, channels, protected, k, dtype):
    x, g = tokens(batch, n, channels, dtype=dtype)
    index = picks(batch, n - protected, k, g)
    out = gather_tokens_triton(x, index, protected)
    assert out.shape == (batch, protected + k, channels) and out.dtype == dtype
    assert torch.equal(out, gather_tokens_reference(x, index, protected))


def test_gather_repeats_and_strided_inputs():
    """An index may repeat (early exit's reordering does not, but a gather allows it); tokens may be
    a view with any batch and token strides (A-ViT's heads, a batch of images as rows) or with
    channels apart (copied first)."""
    x, g = tokens(3, 12, 16)
    index = torch.randint(0, 10, (3, 14), generator=g)  # more picks than tokens, repeats
    wide = torch.randn(12, 3, 40, generator=g)[:, :, 4:20].transpose(0, 1)  # strides (40, 120, 1)
    apart = torch.randn(3, 12, 32, generator=g)[:, :, ::2]  # channel stride 2
    for t in (x, wide, apart):
        assert torch.equal(gather_tokens_triton(t, index, 2), gather_tokens_reference(t, index, 2))


# (batch, N, C, K): one token, none replaced, all replaced, odd sizes, several channel blocks
SCATTER = [(1, 1, 8, 1), (3, 17, 24, 0), (2, 9, 20, 9), (5, 33, 12, 14), (1, 30, 1030, 7)]


@pytest.mark.parametrize("batch, n, channels, k", SCATTER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_kernel_equals_the_reference(batch, n, channels, k, dtype):
    base, g = tokens(batch, n, channels, dtype=dtype)
    index = picks(batch, n, k, g)
    src = torch.randn(batch, k, channels, generator=g).to(dtype)
    before = base.clone()
    out = scatter_tokens_triton(base, index, src)
    assert torch.equal(out, scatter_tokens_reference(base, index, src))
    assert torch.equal(base, before)  # out of place: a cached tensor is never modified
    if 0 < k < n:  # the case tells the rows apart: replaced ones differ from base
        assert not torch.equal(out, base)


def masks(batch, n, g):
    """Ragged active tokens: the first image empty, the second full, the rest random."""
    mask = torch.rand(batch, n, generator=g) < 0.45
    mask[0] = False
    if batch > 1:
        mask[1] = True
    return mask


# (batch, N, C): batch 1, odd batches, a count past one tile of rows, several channel blocks
COMPACT = [(1, 1, 8), (2, 1, 5), (3, 17, 24), (5, 70, 12), (4, 130, 3), (2, 6, 1100)]


@pytest.mark.parametrize("batch, n, channels", COMPACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_kernel_equals_the_reference(batch, n, channels, dtype):
    x, g = tokens(batch, n, channels, dtype=dtype)
    mask = masks(batch, n, g)
    want, want_index = x[mask], mask.reshape(-1).nonzero().squeeze(1)  # what the patches did before
    for ref in (compact_tokens_reference(x, mask), compact_tokens_reference(x, mask, int(mask.sum()))):
        assert torch.equal(ref[0], want) and torch.equal(ref[1], want_index)
    packed, index = compact_tokens_triton(x, mask, int(mask.sum()))
    assert torch.equal(packed, want) and torch.equal(index, want_index)
    # the index scatters them back: a copy of x where nothing changed
    back = scatter_tokens_triton(x.flatten(0, 1)[None], index[None], packed[None])
    assert torch.equal(back.view_as(x), x)


def test_compact_nothing_everything_and_a_wrong_count():
    x, g = tokens(3, 10, 16)
    none = torch.zeros(3, 10, dtype=torch.bool)
    packed, index = compact_tokens_triton(x, none, 0)
    assert packed.shape == (0, 16) and index.shape == (0,)
    packed, index = compact_tokens_triton(x, ~none, 30)
    assert torch.equal(packed, x.reshape(30, 16)) and torch.equal(index, torch.arange(30))
    mask = masks(3, 10, g)
    m = int(mask.sum())
    short, short_index = compact_tokens_triton(x, mask, m - 3)  # never written past the count given
    assert torch.equal(short, x[mask][: m - 3]) and torch.equal(short_index, mask.reshape(-1).nonzero()[: m - 3, 0])


def test_the_dispatcher_records_and_refuses_clearly(monkeypatch):
    monkeypatch.delenv("ACCEL_KERNELS", raising=False)
    x, g = tokens(2, 6, 4)
    index = picks(2, 6, 3, g)
    mask = masks(2, 6, g)
    calls = {"gather_tokens": lambda **kw: gather_tokens(x, index, **kw),
             "scatter_tokens": lambda **kw: scatter_tokens(x, index, x[:, :3] + 1, **kw),
             "compact_tokens": lambda **kw: compact_tokens(x, mask, **kw)}
    for op, call in calls.items():
        reference = call()
        assert last_backend(op) == "torch"  # a CPU tensor: the reference
        fused = call(backend="triton")  # the interpreter runs the kernel
        assert last_backend(op) == "triton"
        for got, want in zip(fused if isinstance(fused, tuple) else [fused], reference if isinstance(
                reference, tuple) else [reference]):
            assert torch.equal(got, want)
    monkeypatch.setenv("ACCEL_KERNELS", "triton")
    compact_tokens(x, mask)  # no count: counted on the host, then the kernel
    assert last_backend("compact_tokens") == "triton"
    errors = [
        (lambda: gather_tokens(x[0], index), "gather_tokens: x must be"),
        (lambda: gather_tokens(x, index.int()), "gather_tokens: index must be an int64"),
        (lambda: gather_tokens(x, index[:1]), "index must be an int64 \\[B, K\\] tensor with B=2"),
        (lambda: gather_tokens(x, index, protected=7), "protected must be an int in \\[0, N=6\\]"),
        (lambda: scatter_tokens(x, index, x[:, :2]), "scatter_tokens: src must be"),
        (lambda: scatter_tokens(x, index, x[:, :3].double()), "src must be .* in base's dtype"),
        (lambda: scatter_tokens(x, picks(2, 6, 6, g).repeat(1, 2), x.repeat(1, 2, 1)), "more than base's 6"),
        (lambda: compact_tokens(x, mask.int()), "compact_tokens: mask must be a bool"),
        (lambda: compact_tokens(x, mask, count=13), "count must be None or an int in \\[0, B\\*N=12\\]"),
    ]
    for call, message in errors:
        with pytest.raises(ValueError, match=message):
            call()


def test_compile_traces_through_the_ops_without_a_graph_break():
    x, g = tokens(2, 9, 8)
    index, mask = picks(2, 9, 4, g), masks(2, 9, g)
    count = int(mask.sum())

    def fn(x, index, mask):
        picked = gather_tokens(x, index, 1, backend="triton")
        packed, flat = compact_tokens(x, mask, count, backend="triton")
        back = scatter_tokens(x.flatten(0, 1)[None], flat[None], packed[None] * 2, backend="triton")
        return picked, back

    eager = fn(x, index, mask)  # the first call builds the ops, outside any graph
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(x, index, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(fn, backend="eager")(x, index, mask)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    torch._dynamo.reset()


# -- the patches on the kernels: the same bits as on the references --------------------------------
def both_backends(monkeypatch, run, ops):
    """``run()`` with ACCEL_KERNELS=torch, then =triton (the interpreter); the second must have run
    each of ``ops`` on its kernel."""
    with torch.inference_mode():
        monkeypatch.setenv("ACCEL_KERNELS", "torch")
        reference = run()
        for op in ops:
            assert last_backend(op) == "torch"
        monkeypatch.setenv("ACCEL_KERNELS", "triton")
        fused = run()
    for op in ops:
        assert last_backend(op) == "triton", op
    return reference, fused


def test_evit_on_the_kernels(monkeypatch):
    model, x = make_vit(), images(3)
    accel.patch(model, evit=accel.EViT(keep_rate=0.5))
    reference, fused = both_backends(monkeypatch, lambda: model(x), ["gather_tokens"])
    assert torch.equal(fused, reference)


def test_token_exit_on_the_kernels(monkeypatch):
    from accel.token_exit import relative_update

    model, x = make_vit(), images(3, seed=1)
    with torch.inference_mode():  # about half the patches stop after block 0, differently per image
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        threshold = float(relative_update(model.blocks[0](t), t)[:, 1:].median())
    accel.patch(model, token_exit=threshold)
    reference, fused = both_backends(monkeypatch, lambda: model(x), OPS)
    last = accel.describe(model)["methods"]["token_exit"]["last_call"]
    assert last["active_tokens"][-1] < last["tokens"][-1]  # tokens were really packed and scattered
    assert torch.equal(fused, reference)


def test_avit_removal_on_the_kernels(monkeypatch):
    model, x = make_vit(), images(5)  # odd batch; images halt differently: padding per image
    accel.patch(model, avit=accel.AViT(gamma=3.0, beta=1.0, mode="remove"))
    reference, fused = both_backends(monkeypatch, lambda: model(x), OPS + ("biased_attention",))
    computed = accel.describe(model)["methods"]["avit"]["last_call"]["computed_tokens"]
    assert computed[-1] < computed[0]
    # the copies are exact; the padded per-image attention (a -inf bias on the padding keys) is the
    # flash kernel against SDPA: fp32 rounding in another order
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


def test_early_exit_on_the_kernels(monkeypatch):
    from accel.early_exit import EarlyExit, ExitHeads
    from accel.patches.early_exit.timm import backbone_exits

    model, x = make_vit(), images(7, seed=2)
    torch.manual_seed(3)
    heads = ExitHeads([0, 1], dim=48, num_classes=10).eval()
    with torch.no_grad():
        for head in heads.heads:
            head.fc.weight.mul_(6.0)
        pooled, _ = backbone_exits(model, x, heads)  # thresholds at the median: some images leave at each exit
        thresholds = [float(accel.early_exit.confidence(heads.heads[k](p)).median()) for k, p in enumerate(pooled)]
    accel.patch(model, early_exit=EarlyExit(heads, thresholds=thresholds))
    reference, fused = both_backends(monkeypatch, lambda: model(x), ["compact_tokens", "gather_tokens"])
    assert accel.describe(model)["methods"]["early_exit"]["last_call"]["exited"][0] > 0
    assert torch.equal(fused, reference)


def test_region_cache_on_the_kernels(monkeypatch):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval()
    accel.patch(model, region_cache=accel.RegionCache(ratio=0.4, warmup=1, refresh=0, metric="std"))

    def run():  # a few denoising-like steps of a bare transformer: step 0 full, then cached steps
        accel.region_cache.reset(model)
        x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        outs = []
        for s in range(3):
            out = model(x, timestep=torch.full((3,), 900 - 100 * s), class_labels=torch.arange(3)).sample
            outs.append(out)
            x = x - 0.1 * out[:, :4]
        return torch.stack(outs)

    reference, fused = both_backends(monkeypatch, run, ["gather_tokens", "scatter_tokens"])
    assert accel.describe(model)["methods"]["region_cache"]["last_call"]["full_steps"] == [0]
    assert torch.equal(fused, reference)
