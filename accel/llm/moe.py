"""Mixture of Experts for transformers models: routing, a grouped expert dispatch, and that dispatch
as a transformers experts backend.

    import accel.llm.moe as moe
    moe.register()                                                   # once: "accel" joins transformers' backends
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="accel")
    model.set_experts_implementation("accel")                       # or on a model already loaded
    moe.unregister()                                                 # and back

    weights, experts = moe.softmax_top_k(logits, top_k=2)           # Mixtral (renormalised), Qwen2-MoE
    weights, experts = moe.sigmoid_group_top_k(logits, bias, top_k=8, groups=8, top_groups=4, scale=2.5)  # DeepSeek-V3
    out = moe.grouped_experts(x, experts, weights, gate_up_proj, down_proj)   # = moe.loop_experts(...)

**Routing** (scores in float32 whatever the model's dtype, as transformers computes them):
- ``softmax_top_k``: softmax over the experts, the top ``k``, renormalised to sum to 1 (Mixtral) or
  not (Qwen2-MoE's ``norm_topk_prob=False``);
- ``sigmoid_group_top_k``: DeepSeek-V3. Sigmoid scores; a selection bias added for choosing only;
  experts in groups, each group scored by the sum of its two best, only the ``top_groups`` best
  groups eligible; the weights are the unbiased scores of the chosen, renormalised and scaled;
- ``update_selection_bias``: DeepSeek-V3's balancing without an auxiliary loss,
  ``b_i -= rate * sign(load_i - mean load)``.

**Dispatch** (``grouped_experts``): the (token, expert) pairs sorted by expert once; each
expert's tokens gathered, run through its SwiGLU as one product per weight, weighted, and added
into their rows. Weights in transformers' layout (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H,
I]``), so a transformers model's experts run on it unchanged. On the CPU an expert's products over
a few rows take the weight on the left (``accel.kernels.few_rows_linear``), which is faster there
for the few tokens an expert gets while decoding. ``loop_experts`` is the plain reference: token
by token, each chosen expert in turn, ``F.linear``.

**As a transformers experts backend** (``register``): transformers' MoE models route their
tokens with their own routers and call their ``Experts`` module, which dispatches through
``ExpertsInterface`` by ``config._experts_implementation``. ``register`` adds ``"accel"`` there;
layouts this dispatch does not take (transposed or interleaved gate/up weights, experts without a
gate, biases, a norm after each expert, expert parallelism) go to transformers' own ``grouped_mm``
function unchanged.

**Capacity and training**: ``apply_capacity`` (Switch capacity, dropped pairs skipped, a token
with every pair dropped passing on the residual), ``jitter``, ``load_balancing_loss`` and
``router_z_loss``. ``MoEBlock`` puts a router, experts, capacity and shared experts together, and
``upcycle`` turns a dense causal LM's MLPs into such blocks (Komatsuzaki et al.).

On CUDA the dispatch runs ``accel.kernels.grouped_matmul``'s Triton kernel (after vLLM's
``fused_moe``: pairs padded per expert to blocks, rows gathered in the kernel's prologue, the
routing weight applied in its epilogue), tested in Triton's CPU interpreter; no GPU figures yet.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["softmax_top_k", "sigmoid_group_top_k", "update_selection_bias", "apply_capacity", "jitter",
           "load_balancing_loss", "router_z_loss", "grouped_experts", "loop_experts", "experts_forward", "register",
           "unregister", "BACKEND", "MoEBlock", "upcycle"]

BACKEND = "accel"  # the name under which ``register`` adds the dispatch to transformers' experts backends


def _check_top_k(owner: str, top_k: Any, experts: int) -> int:
    from ..patches.settings import check_int

    check_int(owner, "top_k", top_k, 1, f"an int in [1, {experts}] (the number of experts)")
    if top_k > experts:
        raise ValueError(f"{owner}: top_k must be an int in [1, {experts}] (the number of experts); got {top_k}")
    return top_k


def _check_capacity(owner: str, capacity_factor: Any, optional: bool = True) -> None:
    """A capacity factor: a finite float > 0 (or None, no limit, where ``optional``)."""
    from ..patches.settings import check_real

    if capacity_factor is not None or not optional:
        check_real(owner, "capacity_factor", capacity_factor, lambda v: 0 < v < float("inf"),
                   "a finite float > 0" + (", or None" if optional else ""))


def softmax_top_k(logits: torch.Tensor, top_k: int, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router ``logits [T, E]`` -> (weights ``[T, k]`` float32, experts ``[T, k]``): the ``top_k``
    largest softmax probabilities, renormalised to sum to 1 when ``normalize`` (Mixtral; Qwen2-MoE
    with ``norm_topk_prob``)."""
    _check_top_k("softmax_top_k", top_k, logits.shape[-1])
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def sigmoid_group_top_k(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, groups: int = 1,
                        top_groups: int = 1, scale: float = 1.0, normalize: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing of ``logits [T, E]``: scores ``sigmoid(logits)``; for choosing only,
    ``scores + bias`` (``bias [E]``, None: zeros); the experts split into ``groups`` equal groups,
    each scored by the sum of its two best biased scores, and only the ``top_groups`` best groups'
    experts eligible; the ``top_k`` best eligible experts chosen. Their weights are their unbiased
    scores, divided by their sum when ``normalize``, times ``scale``. Returns (weights ``[T, k]``
    float32, experts ``[T, k]``)."""
    from ..patches.settings import check_int

    experts = logits.shape[-1]
    check_int("sigmoid_group_top_k", "groups", groups, 1)
    if experts % groups:
        raise ValueError(f"sigmoid_group_top_k: groups must divide the number of experts ({experts}); got {groups}")
    check_int("sigmoid_group_top_k", "top_groups", top_groups, 1, f"an int in [1, {groups}] (groups)")
    if top_groups > groups:
        raise ValueError(f"sigmoid_group_top_k: top_groups must be an int in [1, {groups}] (groups); got {top_groups}")
    _check_top_k("sigmoid_group_top_k", top_k, experts * top_groups // groups)
    scores = logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if groups > 1:
        per_group = choice.view(-1, groups, experts // groups)
        group_scores = per_group.topk(min(2, experts // groups), dim=-1).values.sum(dim=-1)  # [T, groups]
        best = group_scores.topk(top_groups, dim=-1).indices
        eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~eligible.repeat_interleave(experts // groups, dim=1), float("-inf"))
    chosen = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, chosen)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, chosen


def update_selection_bias(bias: torch.Tensor, experts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's balancing without an auxiliary loss, in place: each expert's selection bias
    moves by ``rate`` against the sign of its load minus the mean load, the load counted over the
    chosen ``experts [T, k]`` of a batch (dropped pairs, -1, not counted). Returns ``bias``."""
    load = torch.bincount(experts[experts >= 0], minlength=bias.shape[0])[:bias.shape[0]].to(bias.dtype)
    bias -= rate * torch.sign(load - load.mean())
    return bias


def apply_capacity(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity_factor: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Switch-style capacity (Fedus et al. 2021): each expert takes at most ``ceil(capacity_factor *
    T * k / E)`` of the ``T * k`` (token, expert) pairs of ``experts [T, k]``. Slots go to first
    choices before second choices, and within a rank in token order (GShard's priority). A pair
    over capacity is dropped: its expert becomes -1 and its weight 0, so the dispatch skips it and
    a token with every pair dropped passes on the residual alone. Returns (experts, weights, kept
    ``[T, k]`` bool)."""
    _check_capacity("apply_capacity", capacity_factor, optional=False)
    tokens, top_k = experts.shape
    capacity = math.ceil(capacity_factor * tokens * top_k / num_experts)
    ranked = experts.t().reshape(-1)  # all first choices, then all second choices, ...
    onehot = F.one_hot(ranked.clamp_min(0), num_experts) * (ranked >= 0)[:, None]
    slot = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # the pair's place in its expert's queue
    kept = ((slot < capacity) & (ranked >= 0)).view(top_k, tokens).t()
    return torch.where(kept, experts, -1), torch.where(kept, weights, torch.zeros_like(weights)), kept


def jitter(hidden: torch.Tensor, noise: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Router input jitter (Switch): ``hidden`` times uniform noise in ``[1 - noise, 1 + noise]``, for
    training only."""
    scale = torch.empty_like(hidden).uniform_(1.0 - noise, 1.0 + noise, generator=generator)
    return hidden * scale


def load_balancing_loss(logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss for ``logits [T, E]`` and the chosen ``experts [T, k]``: ``E * sum_i
    f_i * P_i``, with ``f_i`` the fraction of the ``T * k`` pairs routed to expert ``i`` and ``P_i``
    its mean router probability. 1 when both are uniform; larger when the load is skewed."""
    count = logits.shape[-1]
    valid = experts[experts >= 0]
    fraction = torch.bincount(valid, minlength=count).to(torch.float32) / experts.numel()
    return count * (fraction * logits.float().softmax(dim=-1).mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022) for ``logits [T, E]``: the mean over tokens of
    ``logsumexp(logits)^2``, which keeps the router's logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
            linear: Callable[..., torch.Tensor]) -> torch.Tensor:
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(act(gate) * up, down)


def grouped_experts(hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor] = F.silu, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{experts[t, j]}(hidden[t])`` for ``hidden [T, H]``, ``experts,
    weights [T, k]``, with SwiGLU experts ``down(act(gate) * up)`` in transformers' layout
    (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). The pairs are sorted by expert once; each
    expert's segment of tokens is gathered, run as one product per weight, weighted, and added into
    its tokens' rows. Ids outside ``[0, E)`` (dropped pairs, or another rank's experts) contribute
    nothing.

    ``backend`` (as ``accel.kernels``'): on CUDA (or ``"triton"``) the two products run as
    ``accel.kernels.grouped_matmul``'s Triton kernel over a block-aligned layout; elsewhere (or
    ``"torch"``) the loop above."""
    from ..kernels.dispatch import select
    from ..kernels.linear import few_rows_linear

    if select("grouped_matmul", hidden, backend) == "triton":
        return _grouped_experts_kernel(hidden, experts, weights, gate_up_proj, down_proj, act)

    top_k = experts.shape[1]
    count = gate_up_proj.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ranked = flat[order]
    first = int((ranked < 0).sum())  # negative ids sort first; ids >= count sort last
    sizes = torch.bincount(ranked[first:].clamp_max(count), minlength=count + 1)[:count].tolist()
    pair_weights = weights.reshape(-1)[order].to(hidden.dtype)
    out = torch.zeros_like(hidden)
    start = first
    for expert, size in enumerate(sizes):
        if size:
            pairs = order[start:start + size]
            tokens = pairs // top_k
            y = _swiglu(hidden[tokens], gate_up_proj[expert], down_proj[expert], act, few_rows_linear)
            out.index_add_(0, tokens, y * pair_weights[start:start + size, None])
            start += size
    return out


def _grouped_experts_kernel(hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                            gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``grouped_experts`` on the Triton kernel: the pairs laid out in blocks of one expert each
    (``align_pairs``), the first product gathering each pair's token row, the second weighting each
    pair, then each token's ``k`` rows summed."""
    from ..kernels.grouped_matmul import align_pairs, grouped_matmul

    tokens, top_k = experts.shape
    pairs_count = tokens * top_k
    block = 16 if pairs_count <= 16 * gate_up_proj.shape[0] else 64  # decode: little padding; prefill: bigger tiles
    pairs, block_experts = align_pairs(experts, gate_up_proj.shape[0], block)
    up = grouped_matmul(hidden, gate_up_proj, pairs, block_experts, block, pairs_count, top_k, backend="triton")
    gate, value = up.chunk(2, dim=-1)
    inner = act(gate) * value
    out = grouped_matmul(inner, down_proj, pairs, block_experts, block, pairs_count, 1,
                         weights.reshape(-1).to(hidden.dtype), backend="triton")
    return out.view(tokens, top_k, -1).sum(dim=1)


def loop_experts(hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                 down_proj: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """The reference for ``grouped_experts``: token by token, each chosen expert in turn."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if 0 <= e < gate_up_proj.shape[0]:
                out[t] += weights[t, j].to(out.dtype) * _swiglu(hidden[t:t + 1], gate_up_proj[e], down_proj[e], act,
                                                                F.linear)[0]
    return out


def experts_forward(module: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """A transformers ``Experts`` module's forward on ``grouped_experts`` (the signature of
    transformers' experts backends). Layouts it does not take go to transformers' ``grouped_mm``."""
    gating = getattr(type(module), "_apply_gate", None)
    plain = (getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
             and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
             and not getattr(module, "has_post_expert_norm", False) and not getattr(module, "_is_expert_parallel", False)
             and getattr(gating, "__name__", "_default_apply_gate") == "_default_apply_gate")
    if not plain:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    return grouped_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                           module.act_fn).to(hidden_states.dtype)


def register() -> None:
    """Add ``experts_forward`` to transformers' experts backends as ``"accel"`` (for
    ``from_pretrained(..., experts_implementation="accel")`` and ``set_experts_implementation``)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(BACKEND, experts_forward)


def unregister() -> None:
    """Remove ``"accel"`` from transformers' experts backends (models still set to it then raise
    transformers' own error naming it)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface._global_mapping.pop(BACKEND, None)


class MoEBlock(nn.Module):
    """A routed Mixture-of-Experts MLP for a decoder layer, in transformers' expert layout.

    - ``router``: ``nn.Linear(hidden, num_experts)`` without bias;
    - ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: SwiGLU experts ``down(act(gate) * up)``;
    - ``routing="softmax"``: ``softmax_top_k`` (``normalize``: renormalised, Mixtral);
      ``routing="sigmoid"``: ``sigmoid_group_top_k`` with ``groups``, ``top_groups``, ``scale`` and
      the buffer ``selection_bias`` (DeepSeek-V3; ``update_selection_bias`` moves it);
    - ``capacity_factor``: None (no limit) or Switch capacity with dropping (``apply_capacity``);
    - ``shared``: a module every token also goes through (shared experts), added to the output;
    - ``jitter_noise``: router input jitter while training.

    While training, ``losses`` holds the step's ``load_balancing`` and ``z`` losses, for the
    caller to weigh into its objective."""

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, *, routing: str = "softmax",
                 normalize: bool = True, groups: int = 1, top_groups: int = 1, scale: float = 1.0,
                 capacity_factor: Optional[float] = None, shared: Optional[nn.Module] = None,
                 jitter_noise: float = 0.0, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        from ..patches.settings import check_choice, check_int, check_real

        check_int("MoEBlock", "num_experts", num_experts, 1)
        _check_top_k("MoEBlock", top_k, num_experts)
        check_choice("MoEBlock", "routing", routing, ("softmax", "sigmoid"))
        _check_capacity("MoEBlock", capacity_factor)
        check_real("MoEBlock", "jitter_noise", jitter_noise, lambda v: 0 <= v < 1, "a float in [0, 1)")
        if routing == "sigmoid":  # groups and top_groups checked now, not at the first forward
            sigmoid_group_top_k(torch.zeros(1, num_experts), None, top_k, groups, top_groups)
        self.num_experts, self.top_k, self.routing, self.normalize = num_experts, top_k, routing, normalize
        self.groups, self.top_groups, self.scale = groups, top_groups, scale
        self.capacity_factor, self.jitter_noise, self.act = capacity_factor, jitter_noise, act
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        for weight in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(weight, std=hidden ** -0.5)
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.shared = shared
        self.losses: dict = {}

    def route(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [T, H]`` -> (router logits ``[T, E]``, weights ``[T, k]``, experts ``[T, k]``, -1
        where capacity dropped a pair)."""
        if self.training and self.jitter_noise:
            hidden = jitter(hidden, self.jitter_noise)
        if self.routing == "sigmoid":  # DeepSeek-V3 computes its router's logits in float32
            logits = F.linear(hidden.float(), self.router.weight.float())
        else:
            logits = self.router(hidden)
        if self.routing == "softmax":
            weights, experts = softmax_top_k(logits, self.top_k, self.normalize)
        else:
            weights, experts = sigmoid_group_top_k(logits, self.selection_bias, self.top_k, self.groups,
                                                   self.top_groups, self.scale, self.normalize)
        if self.capacity_factor is not None:
            experts, weights, _ = apply_capacity(experts, weights, self.num_experts, self.capacity_factor)
        return logits, weights, experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        logits, weights, experts = self.route(flat)
        if self.training:
            self.losses = {"load_balancing": load_balancing_loss(logits, experts), "z": router_z_loss(logits)}
        out = grouped_experts(flat, experts, weights, self.gate_up_proj, self.down_proj, self.act)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)


def _dense_mlps(model: Any) -> List[Tuple[nn.Module, nn.Module]]:
    """(decoder layer, its SwiGLU MLP) for every layer of a transformers decoder LM, or a TypeError."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TypeError(f"upcycle: model must be a transformers decoder LM with .{getattr(model, 'base_model_prefix', 'model')}"
                        f".layers; got {type(model).__name__}")
    found = []
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(p) is nn.Linear and p.bias is None for p in parts) or not callable(getattr(mlp, "act_fn", None)):
            raise TypeError(f"upcycle: decoder layer {index} has no dense SwiGLU MLP (.mlp with gate_proj, up_proj, "
                            f"down_proj linear layers without bias and an act_fn); got {type(mlp).__name__}")
        found.append((layer, mlp))
    return found


def upcycle(model: Any, num_experts: int, top_k: int, *, capacity_factor: Optional[float] = None,
            router_std: float = 0.02, seed: int = 0) -> Any:
    """Sparse upcycling (Komatsuzaki et al., ICLR 2023): every decoder layer's dense SwiGLU MLP of a
    transformers causal LM becomes a ``MoEBlock`` of ``num_experts`` copies of it, with a router
    drawn from ``N(0, router_std)`` (seeded) and renormalised softmax top-``top_k`` routing.

    Right after upcycling, without a capacity limit, every token's chosen weights sum to 1 over
    copies of the same MLP, so the model computes what the dense one did (up to rounding); training
    then makes the copies differ. Changes ``model`` in place and returns it: its state-dict keys
    change (``mlp.router.weight``, ``mlp.gate_up_proj``, ``mlp.down_proj``), so this is a function,
    not an ``accel.patch`` method. To reload, upcycle the dense model the same way and
    ``load_state_dict``. Bad input raises before anything is changed."""
    from ..patches.settings import check_int, check_real

    check_int("upcycle", "num_experts", num_experts, 1)
    _check_top_k("upcycle", top_k, num_experts)
    check_real("upcycle", "router_std", router_std, lambda v: 0 <= v < float("inf"), "a finite float >= 0")
    _check_capacity("upcycle", capacity_factor)
    mlps = _dense_mlps(model)
    generator = torch.Generator().manual_seed(seed)
    for layer, mlp in mlps:
        weight = mlp.gate_proj.weight
        block = MoEBlock(weight.shape[1], weight.shape[0], num_experts, top_k, capacity_factor=capacity_factor,
                         act=mlp.act_fn).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            block.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None].expand_as(
                block.gate_up_proj))
            block.down_proj.copy_(mlp.down_proj.weight[None].expand_as(block.down_proj))
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=generator) * router_std)
        layer.mlp = block
    return model
