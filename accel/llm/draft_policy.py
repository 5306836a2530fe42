"""How many tokens to draft in each pass, chosen from measured goodput (after SmartSpec, Liu et al.
2024, "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput").

Drafting ``k`` tokens pays when the tokens a pass yields grow faster than what the pass costs. A
pass with ``k`` drafted tokens yields ``1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)`` tokens per row
in expectation, with ``a`` the rate at which drafted tokens are accepted (Leviathan et al. 2023,
Eq. 1), and costs the round's wall time ``T(k)``: drafting, the target's pass over ``k + 1``
positions per row, and the bookkeeping. On a small batch on a GPU ``T`` hardly grows with ``k``;
on a busy CPU, or at larger batches, it grows nearly in proportion, and speculation can slow
decoding down. The policy measures both as it decodes and drafts the ``k`` with the most expected
tokens per second:

    policy = GoodputPolicy(most=3)
    k = policy.choose(rows)                 # this round's draft length, 0 .. most
    ...                                     # draft k (or fewer), verify, time the round
    policy.record(k, seconds, drafted, accepted, rows)

- ``a``: accepted over drafted tokens so far in the call, starting from one of two (a prior of 1/2).
- ``T``: a function of the positions the target checks, ``rows * (1 + k)`` for a batch of ``rows``
  rows, since in batched decoding rows that finish leave and later rounds are cheaper: the median
  of the latest rounds timed at those positions; between measured counts linear interpolation,
  beyond them the nearest measured slope. The first rounds measure ``most`` and 0.
- While the best length is 0 nothing is drafted, so every ``refresh`` rounds one round drafts a
  token to keep ``a`` current.
"""
from __future__ import annotations

import statistics
from collections import Counter, deque
from typing import Deque, Dict, Optional

__all__ = ["GoodputPolicy", "expected_tokens"]


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a pass with ``k`` drafted tokens yields per row, each accepted with probability
    ``acceptance`` until the first rejection, plus the target's own: ``sum_{i<=k} acceptance^i``."""
    return sum(acceptance ** i for i in range(k + 1))


class GoodputPolicy:
    """The draft length of each round, 0 to ``most``, from measured round times and acceptance."""

    def __init__(self, most: int, refresh: int = 16, window: int = 8) -> None:
        self.most, self.refresh = most, refresh
        self.seconds: Dict[int, Deque[float]] = {}  # by positions checked, rows * (1 + k)
        self.window = window
        self.drafted = self.accepted = self.rounds = 0
        self.chosen: Counter = Counter()

    def acceptance(self) -> float:
        return (self.accepted + 1) / (self.drafted + 2)

    def cost(self, k: int, rows: int = 1) -> float:
        """The estimated seconds of a round drafting ``k`` tokens for each of ``rows`` rows (at least
        two position counts measured)."""
        at = rows * (1 + k)
        measured = sorted(self.seconds)
        times = {m: statistics.median(self.seconds[m]) for m in measured}
        if at in times:
            return times[at]
        below = [m for m in measured if m < at]
        above = [m for m in measured if m > at]
        if below and above:
            lo, hi = below[-1], above[0]
        elif below:
            lo, hi = (below[-2], below[-1]) if len(below) > 1 else (below[-1], below[-1])
        else:
            lo, hi = (above[0], above[1]) if len(above) > 1 else (above[0], above[0])
        if lo == hi:
            return times[lo]
        slope = (times[hi] - times[lo]) / (hi - lo)
        return max(times[lo] + slope * (at - lo), 1e-9)

    def choose(self, rows: int = 1) -> int:
        for k in (self.most, 0):  # measure the two ends first
            if k not in self.chosen:
                return k
        alpha = self.acceptance()
        best = max(range(self.most + 1), key=lambda k: expected_tokens(alpha, k) / self.cost(k, rows))
        if best == 0 and self.most > 0 and self.rounds % self.refresh == self.refresh - 1:
            return 1  # drafting nothing teaches nothing about acceptance: look again now and then
        return best

    def record(self, k: int, seconds: float, drafted: int, accepted: int, rows: int = 1) -> None:
        """A round that chose ``k`` for ``rows`` rows: its wall time, and how many tokens it drafted
        and had accepted (over every row)."""
        self.seconds.setdefault(rows * (1 + k), deque(maxlen=self.window)).append(seconds)
        self.drafted, self.accepted = self.drafted + drafted, self.accepted + accepted
        self.rounds += 1
        self.chosen[k] += 1

    def summary(self) -> Dict[str, Optional[float]]:
        """For the request's stats: the mean draft length chosen and the acceptance it estimated."""
        total = sum(self.chosen.values())
        return {"mean_draft_length": (sum(k * n for k, n in self.chosen.items()) / total) if total else None,
                "rounds_without_drafting": (self.chosen[0] / total) if total else None}
