"""Mixture of Experts (``accel.llm.moe``): routing against hand-computed values and transformers' own
routers, the grouped dispatch against a token-by-token loop, and the dispatch as transformers'
experts backend against its eager experts on small Mixtral, Qwen2-MoE and DeepSeek-V3 models
(seeded, float64)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from accel.llm import moe

pytestmark = pytest.mark.usefixtures("one_thread")


def expert_weights(experts=6, hidden=16, inner=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(experts, 2 * inner, hidden, generator=g, dtype=torch.float64) / 4,
            torch.randn(experts, hidden, inner, generator=g, dtype=torch.float64) / 4)


def routed(tokens=9, experts=6, top_k=2, hidden=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    weights, chosen = moe.softmax_top_k(torch.randn(tokens, experts, generator=g, dtype=torch.float64), top_k)
    return x, chosen, weights.double()


# -- the dispatch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (3, 2), (9, 2), (40, 3)])
def test_the_grouped_dispatch_equals_the_token_by_token_loop(tokens, top_k):
    gate_up, down = expert_weights()
    x, chosen, weights = routed(tokens, top_k=top_k)
    got = moe.grouped_experts(x, chosen, weights, gate_up, down)
    torch.testing.assert_close(got, moe.loop_experts(x, chosen, weights, gate_up, down), rtol=1e-12, atol=1e-12)


def test_the_loop_is_the_weighted_sum_of_swiglu_experts_written_out():
    gate_up, down = expert_weights()
    x, chosen, weights = routed(4)
    for t in range(4):
        want = sum(float(weights[t, j]) * (F.silu(x[t] @ gate_up[e, :12].T) * (x[t] @ gate_up[e, 12:].T)) @ down[e].T
                   for j, e in enumerate(chosen[t].tolist()))
        torch.testing.assert_close(moe.loop_experts(x, chosen, weights, gate_up, down)[t], want)


def test_dropped_pairs_contribute_nothing():
    """Ids outside [0, E) (a dropped pair, another rank's expert) are skipped: the same as a zero weight."""
    gate_up, down = expert_weights()
    x, chosen, weights = routed(8)
    dropped = chosen.clone()
    dropped[1, 0], dropped[5, 1] = -1, 6
    zeroed = weights.clone()
    zeroed[1, 0] = zeroed[5, 1] = 0.0
    got = moe.grouped_experts(x, dropped, weights, gate_up, down)
    torch.testing.assert_close(got, moe.grouped_experts(x, chosen, zeroed, gate_up, down), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, moe.loop_experts(x, dropped, weights, gate_up, down), rtol=1e-12, atol=1e-12)


def test_perturbing_one_expert_changes_only_the_tokens_routed_to_it():
    gate_up, down = expert_weights()
    x, chosen, weights = routed(30)
    before = moe.grouped_experts(x, chosen, weights, gate_up, down)
    gate_up[3] += 0.5
    after = moe.grouped_experts(x, chosen, weights, gate_up, down)
    routed_to_3 = (chosen == 3).any(dim=1)
    assert routed_to_3.any() and (~routed_to_3).any()
    assert torch.equal(before[~routed_to_3], after[~routed_to_3])
    assert ((before - after).abs().amax(dim=1)[routed_to_3] > 1e-6).all()


# -- routing ---------------------------------------------------------------------------------------


def test_softmax_top_k_against_numbers_worked_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))  # softmax: the same probabilities
    weights, chosen = moe.softmax_top_k(logits, 2)
    assert chosen.tolist() == [[1, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    weights, _ = moe.softmax_top_k(logits, 2, normalize=False)
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.3]]))
    assert moe.softmax_top_k(logits.half(), 1)[0].dtype == torch.float32  # routing in float32


def test_sigmoid_group_top_k_against_numbers_worked_by_hand():
    """4 experts in 2 groups, 1 group kept, 1 expert chosen. The bias makes expert 0's group best
    and expert 0 chosen, but its weight is its unbiased score (times the scale)."""
    scores = torch.tensor([[0.5, 0.1, 0.6, 0.7]])
    logits = torch.log(scores / (1 - scores))  # sigmoid(logits) = scores
    weights, chosen = moe.sigmoid_group_top_k(logits, None, top_k=1, groups=2, top_groups=1, scale=2.0,
                                              normalize=False)
    assert chosen.tolist() == [[3]]
    torch.testing.assert_close(weights, torch.tensor([[1.4]]))
    bias = torch.tensor([0.9, 0.0, 0.0, 0.0])
    weights, chosen = moe.sigmoid_group_top_k(logits, bias, top_k=1, groups=2, top_groups=1, scale=2.0,
                                              normalize=False)
    assert chosen.tolist() == [[0]]
    torch.testing.assert_close(weights, torch.tensor([[1.0]]))
    weights, chosen = moe.sigmoid_group_top_k(logits, None, top_k=2, groups=2, top_groups=1)
    assert sorted(chosen[0].tolist()) == [2, 3]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_the_selection_bias_changes_the_choice_not_the_weights():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 8, generator=g)
    plain_w, plain_e = moe.sigmoid_group_top_k(logits, None, top_k=2, groups=4, top_groups=2, normalize=False)
    bias = torch.randn(8, generator=g)
    biased_w, biased_e = moe.sigmoid_group_top_k(logits, bias, top_k=2, groups=4, top_groups=2, normalize=False)
    assert not torch.equal(plain_e.sort(1).values, biased_e.sort(1).values)
    torch.testing.assert_close(biased_w, logits.sigmoid().gather(1, biased_e))  # unbiased scores of the chosen


def test_the_selection_bias_moves_against_the_load():
    bias = torch.zeros(4)
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1]])  # loads 3, 2, 1, 0: mean 1.5
    moe.update_selection_bias(bias, chosen, 0.01)
    torch.testing.assert_close(bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    moe.update_selection_bias(bias, torch.tensor([[3, -1], [3, -1]]), 0.01)  # dropped pairs do not count
    torch.testing.assert_close(bias, torch.tensor([0.0, 0.0, 0.02, 0.0]))  # loads 0, 0, 0, 2: mean 0.5


def test_bad_routing_settings_are_refused_by_name():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"softmax_top_k: top_k must be an int in \[1, 4\]"):
        moe.softmax_top_k(logits, 5)
    with pytest.raises(ValueError, match="top_k must be an int >= 1|top_k must be an int in"):
        moe.softmax_top_k(logits, 0)
    with pytest.raises(ValueError, match="groups must divide the number of experts"):
        moe.sigmoid_group_top_k(logits, None, top_k=1, groups=3)
    with pytest.raises(ValueError, match=r"top_groups must be an int in \[1, 2\]"):
        moe.sigmoid_group_top_k(logits, None, top_k=1, groups=2, top_groups=3)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 2\]"):  # only 1 group of 2 eligible
        moe.sigmoid_group_top_k(logits, None, top_k=3, groups=2, top_groups=1)


# -- transformers' MoE models on the accel backend ---------------------------------------------------


def moe_model(kind):
    import transformers

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                            **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(moe_intermediate_size=24, shared_expert_intermediate_size=32,
                                             num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                                             intermediate_size=48, **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.DeepseekV3Config(moe_intermediate_size=16, intermediate_size=48, n_routed_experts=8,
                                               num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                                               first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16,
                                               q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                               v_head_dim=8, **{**common, "num_key_value_heads": 4})
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval().double()
    for module in model.modules():  # experts and routers start at zeros/empty in some classes: give them values
        for name in ("gate_up_proj", "down_proj"):
            if isinstance(getattr(module, name, None), torch.nn.Parameter) and getattr(module, name).ndim == 3:
                torch.nn.init.normal_(getattr(module, name), std=0.2)
        if type(module).__name__.endswith(("TopKRouter", "TopkRouter")):
            torch.nn.init.normal_(module.weight, std=0.5)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(std=0.1)
    return model


@pytest.fixture
def backend():
    moe.register()
    yield moe.BACKEND
    moe.unregister()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_a_transformers_moe_model_on_the_accel_backend_equals_its_eager_experts(kind, backend):
    model = moe_model(kind)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        want = model(ids).logits
    model.set_experts_implementation(backend)
    calls = []
    original = moe.grouped_experts
    try:
        moe.grouped_experts = lambda *a, **k: calls.append(1) or original(*a, **k)
        with torch.no_grad():
            got = model(ids).logits
    finally:
        moe.grouped_experts = original
    assert calls  # the accel dispatch ran
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


class GatedShared(torch.nn.Module):
    """Qwen2-MoE's shared expert: its MLP scaled by a sigmoid gate of the token."""

    def __init__(self, mlp, gate):
        super().__init__()
        self.mlp, self.gate = mlp, gate

    def forward(self, x):
        return torch.sigmoid(self.gate(x)) * self.mlp(x)


def accel_block_like(block, kind):
    """An ``accel.llm.moe.MoEBlock`` set up as transformers' ``block`` routes, with its weights."""
    experts = block.experts
    count, inner2, hidden = experts.gate_up_proj.shape
    if kind == "mixtral":
        ours = moe.MoEBlock(hidden, inner2 // 2, count, block.gate.top_k)
    elif kind == "qwen2_moe":
        ours = moe.MoEBlock(hidden, inner2 // 2, count, block.gate.top_k, normalize=False,
                            shared=GatedShared(block.shared_expert, block.shared_expert_gate))
    else:
        gate = block.gate
        ours = moe.MoEBlock(hidden, inner2 // 2, count, gate.top_k, routing="sigmoid", groups=gate.num_group,
                            top_groups=gate.topk_group, scale=gate.routed_scaling_factor,
                            normalize=gate.norm_topk_prob, shared=block.shared_experts)
    ours = ours.double().eval()
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        ours.gate_up_proj.copy_(experts.gate_up_proj)
        ours.down_proj.copy_(experts.down_proj)
        if kind == "deepseek_v3":
            ours.selection_bias.copy_(block.gate.e_score_correction_bias)
    return ours


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_an_accel_block_given_the_same_weights_equals_transformers_block(kind):
    """Mixtral (softmax top-2, renormalised), Qwen2-MoE (not renormalised, a gated shared expert) and
    DeepSeek-V3 (sigmoid, biased group-limited choice, scaled, a shared expert)."""
    model = moe_model(kind)
    block = next(m for m in model.modules() if type(m).__name__ in ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
                                                                    "DeepseekV3MoE"))
    x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(accel_block_like(block, kind)(x), block(x), rtol=1e-12, atol=1e-12)


def test_the_backend_registered_and_undone():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    model = moe_model("mixtral")
    assert moe.BACKEND not in ALL_EXPERTS_FUNCTIONS
    with pytest.raises(ValueError, match="accel"):
        model.set_experts_implementation("accel")
    moe.register()
    try:
        assert ALL_EXPERTS_FUNCTIONS[moe.BACKEND] is moe.experts_forward
        model.set_experts_implementation("accel")
        assert model.config._experts_implementation == "accel"
    finally:
        moe.unregister()
    assert moe.BACKEND not in ALL_EXPERTS_FUNCTIONS
    with pytest.raises(KeyError, match="accel"):
        model(torch.tensor([[1, 2, 3]]))


# -- capacity, jitter, losses ----------------------------------------------------------------------


def test_capacity_is_respected_first_choices_first_in_token_order():
    """6 tokens, top-2 over 3 experts, capacity factor 0.5: ceil(0.5 * 12 / 3) = 2 slots each."""
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [2, 1]])
    weights = torch.full((6, 2), 0.5)
    kept_experts, kept_weights, kept = moe.apply_capacity(experts, weights, 3, 0.5)
    # first choices in token order: 0,0 fill expert 0; token 2's 0 dropped; 1 (t3); 2,2 fill expert 2;
    # then second choices: 1 (t0) fills expert 1; t1's 2, t2's 1, t3's 0, t4's 0, t5's 1 dropped
    assert kept.tolist() == [[True, True], [True, False], [False, False], [True, False], [True, False],
                             [True, False]]
    assert torch.equal(kept_experts, torch.where(kept, experts, -1))
    assert torch.equal(kept_weights, torch.where(kept, weights, 0.0))
    for e in range(3):
        assert int((kept_experts == e).sum()) <= 2
    with pytest.raises(ValueError, match="capacity_factor must be a finite float > 0"):
        moe.apply_capacity(experts, weights, 3, 0.0)


def test_a_token_with_every_pair_dropped_passes_on_the_residual_unchanged():
    """In a block, a dropped token's MoE output is zero, so the decoder layer's residual carries it."""
    block = moe.MoEBlock(16, 12, 3, 2, capacity_factor=0.25).double().eval()
    x = torch.randn(1, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, _, experts = block.route(x[0])
    dropped = (experts < 0).all(dim=1)
    assert dropped.any() and (~dropped).any()
    out = block(x)[0]
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    assert (out[~dropped].abs().amax(dim=1) > 0).all()


def test_the_losses_against_numbers_worked_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    experts = torch.tensor([[0], [0]])  # f = (1, 0, 0), P = (0.5, 0.25, 0.25)
    torch.testing.assert_close(moe.load_balancing_loss(logits, experts), torch.tensor(3 * 0.5))
    uniform = torch.zeros(4, 3)
    torch.testing.assert_close(moe.load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0]])),
                               torch.tensor(3 * (0.5 + 0.25 + 0.25) / 3))
    # logsumexp of (0, 0) is log 2, of (1, 1) is 1 + log 2
    torch.testing.assert_close(moe.router_z_loss(torch.tensor([[0.0, 0.0], [1.0, 1.0]])),
                               torch.tensor((math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2))


def test_jitter_scales_within_its_band_and_only_while_training():
    x = torch.ones(200, 8)
    noisy = moe.jitter(x, 0.1, torch.Generator().manual_seed(0))
    assert 0.9 <= float(noisy.min()) and float(noisy.max()) <= 1.1 and float(noisy.std()) > 0.01
    block = moe.MoEBlock(8, 4, 4, 2, jitter_noise=0.2).eval()
    h = torch.randn(5, 8)
    assert torch.equal(block.route(h)[0], block.route(h)[0])  # eval: no jitter
    block.train()
    assert not torch.equal(block.route(h)[0], block.route(h)[0])


def test_a_training_step_through_the_block_reaches_router_and_experts():
    block = moe.MoEBlock(8, 6, 4, 2).train()
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    out = block(x)
    loss = out.pow(2).mean() + 0.01 * block.losses["load_balancing"] + 0.001 * block.losses["z"]
    loss.backward()
    assert block.router.weight.grad.abs().sum() > 0 and block.gate_up_proj.grad.abs().sum() > 0


def test_bad_block_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"MoEBlock: top_k must be an int in \[1, 4\]"):
        moe.MoEBlock(8, 6, 4, 5)
    with pytest.raises(ValueError, match="capacity_factor must be a finite float > 0, or None"):
        moe.MoEBlock(8, 6, 4, 2, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="routing must be one of"):
        moe.MoEBlock(8, 6, 4, 2, routing="argmax")
    with pytest.raises(ValueError, match="groups must divide the number of experts"):
        moe.MoEBlock(8, 6, 4, 2, routing="sigmoid", groups=3)


# -- sparse upcycling ------------------------------------------------------------------------------


def dense_llama(seed=0):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval().double()


def test_upcycled_outputs_equal_the_dense_models_and_the_keys_change():
    model = dense_llama()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(ids).logits
    out = moe.upcycle(model, num_experts=4, top_k=2)
    assert out is model and all(isinstance(layer.mlp, moe.MoEBlock) for layer in model.model.layers)
    assert "model.layers.0.mlp.gate_up_proj" in model.state_dict()
    assert "model.layers.0.mlp.gate_proj.weight" not in model.state_dict()
    with torch.no_grad():  # routing weights are float32 (as transformers computes them): they sum to 1 within 1e-7
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-6, atol=1e-6)
        _, _, experts = model.model.layers[0].mlp.route(torch.randn(20, 32, dtype=torch.float64))
    assert len(set(experts.reshape(-1).tolist())) > 2  # the router spreads tokens over the copies


def test_upcycle_refuses_bad_input_and_leaves_the_model_as_it_was():
    import transformers

    model = dense_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"upcycle: top_k must be an int in \[1, 4\]"):
        moe.upcycle(model, 4, 5)
    with pytest.raises(ValueError, match="upcycle: capacity_factor must be a finite float > 0"):
        moe.upcycle(model, 4, 2, capacity_factor=0.0)
    model.model.layers[1].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(TypeError, match="decoder layer 1 has no dense SwiGLU MLP"):
        moe.upcycle(model, 4, 2)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if "layers.1.mlp.up_proj" not in k)
    with pytest.raises(TypeError, match="upcycle: model must be a transformers decoder LM"):
        moe.upcycle(transformers.GPT2Config(), 4, 2)


def test_upcycling_the_built_in_smollm2_keeps_its_outputs(load_built_in_lm):
    model, tokenizer = load_built_in_lm("smollm2-135m")
    ids = tokenizer("Speculative decoding and mixtures of experts", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = model(ids).logits
        moe.upcycle(model, num_experts=4, top_k=2)
        upcycled = model(ids).logits
    assert sum(isinstance(layer.mlp, moe.MoEBlock) for layer in model.model.layers) == 30
    torch.testing.assert_close(upcycled, dense, rtol=1e-4, atol=5e-4)  # float32 through 30 layers
    assert torch.equal(upcycled[0].argmax(-1), dense[0].argmax(-1))


def test_from_pretrained_takes_the_accel_backend_by_name(tmp_path, backend):
    import transformers

    model = moe_model("mixtral").float()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=backend).eval()
    assert loaded.config._experts_implementation == backend
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
