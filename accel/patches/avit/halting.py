"""A-ViT halting arithmetic (Yin et al., "A-ViT: Adaptive Tokens for Efficient Vision
Transformer", CVPR 2022, Sec. 3): tensors only, no framework.

For token ``k`` after block ``l`` (1-based, ``L`` blocks), with ``t`` the block's output:

    h_k^l = sigmoid(gamma * t_k^l[0] - beta)        halting score from embedding dim 0
    h_k^L = 1                                       every token halts at the last block
    N_k   = min{n : sum_{l<=n} h_k^l >= 1 - eps}     the block after which k halts
    r_k   = 1 - sum_{l<N_k} h_k^l                   remainder
    p_k^l = h_k^l (l < N_k), r_k (l = N_k), 0 after  halting probability; sums to 1 over l
    out_k = sum_l p_k^l t_k^l                       halting-weighted output state (ACT mean field)
    rho_k = N_k + r_k                               ponder cost, L_ponder = mean_k rho_k
    L_distr = KL(Hbar || prior), Hbar^l = mean_k p_k^l, the prior a Gaussian over depth

A token that halts stops being computed (and stops being a key for the others); its output
state is ``out_k``. Tokens that may not halt (``can_halt`` False: the prefix tokens) get
``h = 0`` before the last block, so their output is their last state.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

__all__ = ["halting_score", "HaltingState", "ponder_loss", "halting_distribution", "gaussian_prior",
           "kl_divergence"]


def halting_score(x: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """``x: [..., C]`` -> ``sigmoid(gamma * x[..., 0] - beta)``: ``[...]`` in float32 (``[B, N]``
    for ``x: [B, N, C]``). ``beta = inf`` gives exactly 0: nothing halts."""
    return torch.sigmoid(gamma * x[..., 0].float() - beta)


class HaltingState:
    """Cumulative halting of ``[B, N]`` tokens over ``num_blocks`` blocks, kept flat (token
    ``b * N + n``) so a caller that removed halted tokens can update just the ones it computed.

    cumulative, remainder: ``[B*N]`` float32; active: ``[B*N]`` bool (not yet halted);
    depth: ``[B*N]`` long, blocks a token went through (0 until it halts);
    output: ``[B*N, C]`` the halting-weighted state; mass: per block ``[B*N]`` p (if ``record``).
    """

    def __init__(self, batch: int, tokens: int, num_blocks: int, eps: float, can_halt: torch.Tensor,
                 width: int, device: torch.device, dtype: torch.dtype, record: bool = False) -> None:
        size = batch * tokens
        self.batch, self.tokens, self.num_blocks, self.eps = batch, tokens, num_blocks, eps
        self.can_halt = can_halt.to(device=device, dtype=torch.bool).repeat(batch)  # [B*N]
        self.cumulative = torch.zeros(size, device=device)
        self.remainder = torch.zeros(size, device=device)
        self.active = torch.ones(size, device=device, dtype=torch.bool)
        self.depth = torch.zeros(size, device=device, dtype=torch.long)
        self.output = torch.zeros(size, width, device=device, dtype=dtype)
        self.record = record
        self.mass: List[torch.Tensor] = []
        self.block = 0

    def step(self, h: torch.Tensor, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One block: scores ``h: [T]`` and states ``x: [T, C]`` of the tokens at flat positions
        ``index: [T]`` (every token when None; inactive ones are then ignored). Returns ``[T]``
        bool: the tokens that halt after this block."""
        self.block += 1
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        active, can_halt, before = pick(self.active), pick(self.can_halt), pick(self.cumulative)
        if self.block >= self.num_blocks:
            h = torch.ones_like(before)  # the last block halts every token that is left
        else:
            h = torch.where(can_halt, h.float(), torch.zeros_like(before))
        after = before + h
        halt = active & (after >= 1.0 - self.eps)
        go_on = active & ~halt
        remainder = 1.0 - before
        p = torch.where(go_on, h, torch.where(halt, remainder, torch.zeros_like(h)))
        depth = torch.where(halt, torch.full_like(pick(self.depth), self.block), pick(self.depth))
        updates = dict(cumulative=torch.where(active, after, before), active=go_on, depth=depth,
                       remainder=torch.where(halt, remainder, pick(self.remainder)))
        weighted = p.to(x.dtype)[:, None] * x
        if index is None:  # out of place: the masked path is the one trained through
            for name, value in updates.items():
                setattr(self, name, value)
            self.output = self.output + weighted
            if self.record:
                self.mass.append(p)
        else:
            for name, value in updates.items():
                getattr(self, name).index_put_((index,), value)
            self.output.index_add_(0, index, weighted)
            if self.record:
                self.mass.append(torch.zeros_like(self.cumulative).index_put((index,), p))
        return halt

    def mean_depth(self) -> torch.Tensor:
        """Mean number of blocks the tokens that may halt went through (scalar tensor)."""
        return self.depth[self.can_halt].float().mean()


def ponder_loss(state: HaltingState) -> torch.Tensor:
    """``mean_k (N_k + r_k)`` over the tokens that may halt; differentiable through ``r_k``."""
    rho = state.depth.float() + state.remainder
    return rho[state.can_halt].mean()


def halting_distribution(state: HaltingState) -> torch.Tensor:
    """``[L]``: the halting probability of each block averaged over the tokens that may halt
    (needs ``record=True``); sums to 1."""
    if len(state.mass) != state.num_blocks:
        raise ValueError(f"halting_distribution needs a recorded pass over all {state.num_blocks} blocks; "
                         f"got {len(state.mass)}")
    return torch.stack(state.mass)[:, state.can_halt].mean(dim=1)


def gaussian_prior(num_blocks: int, mean: float, std: float) -> torch.Tensor:
    """``[L]``: a Gaussian over halting depth 1..L centred at ``mean``, normalised to sum 1
    (floored at 1e-12 so the KL stays finite)."""
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"prior_std must be a finite float > 0; got {std}")
    depth = torch.arange(1, num_blocks + 1, dtype=torch.float64)
    prior = torch.exp(-0.5 * ((depth - mean) / std) ** 2)
    prior = (prior / prior.sum()).clamp_min(1e-12)
    return (prior / prior.sum()).float()


def kl_divergence(dist: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``KL(dist || prior) = sum dist * (log dist - log prior)``, with ``0 log 0 = 0``."""
    prior = prior.to(dist.device, dist.dtype)
    return (torch.special.xlogy(dist, dist) - dist * prior.log()).sum()
