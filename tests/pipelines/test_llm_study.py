"""The dense / MoE / MoD study (``accel.pipelines.llm_study``): the FLOPs count against torch's own
count of the products a forward pass runs, and the three shipped models (``assets/llm-study``):
they load offline, score the held-out loss their export recorded, and the MoD model routes 12.5%
of the tokens through every other layer while training and by its predictors while decoding."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import accel.pipelines
from accel.eval.llm import bench_study_models, heldout_loss, windows
from accel.llm.mod import routers_of
from accel.pipelines.llm_study import (ARCHS, ASSET_DIR, MOD_CAPACITY, MOD_LAYERS, build, forward_flops,
                                       heldout_tokens, study_config)

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_flops(config, arch, seq_len):
    """Causal attention per token, written out: in each layer a token's query meets the keys of the
    tokens before it and itself (scores), and their values (weighted sum): 2 x 2 x heads x head_dim
    per position seen, (n + 1) / 2 positions on average among the n tokens that run the layer."""
    width, heads = config.hidden_size, config.num_attention_heads
    total = 0.0
    for layer in range(config.num_hidden_layers):
        share = MOD_CAPACITY if arch == "mod" and layer in MOD_LAYERS else 1.0
        n = math.ceil(share * seq_len)
        total += (n / seq_len) * 2 * 2 * heads * (width // heads) * (n + 1) / 2
    return total


@pytest.mark.parametrize("arch,seq_len", [("dense", 256), ("moe", 256), ("mod", 256), ("mod", 100)])
def test_forward_flops_count_what_the_products_compute(arch, seq_len):
    """torch's FlopCounterMode counts every matrix product of a real forward pass (not attention on
    the CPU, where sdpa is not counted); with causal attention added, that is ``forward_flops``."""
    config = study_config()
    model, _ = build(arch, config)
    ids = torch.randint(4, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(ids, use_cache=False)
    counted = counter.get_total_flops() / seq_len + attention_flops(config, arch, seq_len)
    assert forward_flops(arch, config, seq_len) == pytest.approx(counted, rel=1e-12)


def test_moe_and_dense_compute_alike_and_mod_less():
    config = study_config()
    dense, moe, mod = (forward_flops(arch, config, 256) for arch in ARCHS)
    router = 2 * config.hidden_size * 8 * config.num_hidden_layers
    assert moe - dense == pytest.approx(router)  # equal active parameters, plus the routers
    assert mod < 0.7 * dense


# -- the shipped models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return {arch: accel.pipelines.load(f"study-{arch}") for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_models_score_the_held_out_loss_recorded_at_export(shipped, arch):
    model, _ = shipped[arch]
    recorded = json.loads((ASSET_DIR / arch / "config.json").read_text())["shipped held-out loss"]
    loss = heldout_loss(model, heldout_tokens(), 256, count=8)
    assert loss == pytest.approx(recorded["loss"], abs=1e-4)
    assert recorded["windows"] == 8
    assert loss < 0.6 * math.log(model.config.vocab_size)  # trained: far below a uniform guess


def test_the_tokenizer_round_trips_held_out_text(shipped):
    _, tokenizer = shipped["dense"]
    ids = heldout_tokens()[:200].long().tolist()
    text = tokenizer.decode(ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert "the" in text.split()


def test_the_shipped_mod_model_routes_its_capacity(shipped):
    model, _ = shipped["mod"]
    routers = routers_of(model)
    assert routers is not None and routers.layers == MOD_LAYERS and routers.capacity == MOD_CAPACITY
    seen = {}
    handles = [model.model.layers[i].self_attn.register_forward_hook(
        lambda m, args, out, i=i: seen.__setitem__(i, out[0].shape[1])) for i in range(6)]
    try:
        model(windows(heldout_tokens(), 256, 2)[:, :-1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {i: 32 if i in MOD_LAYERS else 256 for i in range(6)}
    agreement = routers.agreement()
    assert all(0.5 < value <= 1 for value in agreement.values())


def test_the_shipped_mod_model_decodes_as_its_causal_forward(shipped):
    """Greedy decoding (each token routed by the predictors, per-layer caches) gives the tokens the
    full forward with causal routing gives, fed back one at a time."""
    model, _ = shipped["mod"]
    routers = routers_of(model)
    prompt = heldout_tokens()[:40].long()[None]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        routers.routing = "causal"
        try:
            ids = prompt
            for _ in range(12):
                logits = model(ids, use_cache=False).logits[0, -1]
                top = logits.topk(2).values
                assert top[0] - top[1] > 1e-4  # no near-tie that rounding could flip
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        finally:
            routers.routing = "top_k"
    assert out.tolist() == ids.tolist()


def test_bench_study_models_measures_every_model(shipped):
    record = bench_study_models(prompts=1, prompt_tokens=16, new_tokens=4, repeats=1, count=2)
    rows = {row["model"]: row for row in record["rows"]}
    assert list(rows) == [f"study-{arch}" for arch in ARCHS]
    for arch in ARCHS:
        model, _ = shipped[arch]
        assert rows[f"study-{arch}"]["held-out loss"] == pytest.approx(heldout_loss(model, heldout_tokens(), 256, 2))
        assert rows[f"study-{arch}"]["decode tokens/s"] > 0
    assert "predictor agreement" in rows["study-mod"] and "predictor agreement" not in rows["study-dense"]
    assert rows["study-dense"]["decode speedup"] == 1.0
