"""Bipartite soft matching and merging against a slow, loop-based reference."""
import math

import pytest
import torch

from accel.tome import bipartite_soft_matching, merge_source, merge_weighted
from accel.patches.tome.merge import initial_source


def reference_merge(x, metric, size, r, protected):
    """One image at a time, with Python lists: the paper's algorithm spelled out.

    Returns merged x [N', C], size [N'] and the groups (lists of input indices) per output token.
    """
    n = x.shape[0]
    tokens = list(range(protected, n))
    set_a, set_b = tokens[0::2], tokens[1::2]
    r = min(r, len(set_a))

    def cos(i, j):
        u, v = metric[i].double(), metric[j].double()
        return float(u @ v / (u.norm() * v.norm()))

    best = {}
    for i in set_a:
        sims = [cos(i, j) for j in set_b]
        k = max(range(len(sims)), key=lambda t: (sims[t], -t))  # first index among equal maxima
        best[i] = (sims[k], set_b[k])
    ranked = sorted(set_a, key=lambda i: -best[i][0])  # stable: ties keep the lower index first
    merged_away = ranked[:r]
    groups = {j: [j] for j in set_b}
    for i in merged_away:
        groups[best[i][1]].append(i)
    order = [[t] for t in range(protected)]
    order += [[i] for i in set_a if i not in merged_away]
    order += [sorted(groups[j]) for j in set_b]
    out_x, out_size = [], []
    for members in order:
        weights = torch.tensor([float(size[m]) for m in members], dtype=torch.float64)
        rows = torch.stack([x[m].double() for m in members])
        out_x.append((rows * weights[:, None]).sum(0) / weights.sum())
        out_size.append(weights.sum())
    return torch.stack(out_x), torch.stack(out_size), order


@pytest.mark.parametrize("n,protected,r", [(17, 1, 5), (18, 2, 8), (21, 5, 3), (10, 0, 5), (9, 1, 0)])
def test_merge_matches_slow_reference(n, protected, r):
    gen = torch.Generator().manual_seed(n * 100 + r)
    batch, c = 3, 8
    x = torch.randn(batch, n, c, generator=gen)
    metric = torch.randn(batch, n, 4, generator=gen)
    size = torch.randint(1, 4, (batch, n, 1), generator=gen).float()
    match = bipartite_soft_matching(metric, r, protected=protected)
    merged, new_size = merge_weighted(match, x, size)
    assert merged.shape == (batch, n - min(r, (n - protected + 1) // 2), c)
    for b in range(batch):
        ref_x, ref_size, _ = reference_merge(x[b], metric[b], size[b, :, 0], r, protected)
        torch.testing.assert_close(merged[b].double(), ref_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_size[b, :, 0].double(), ref_size)


def test_hand_computed_example():
    # protected CLS, then tokens t1..t6 -> A = {t1, t3, t5}, B = {t2, t4, t6}.
    # t1 is parallel to t4 (cos 1), t3 close to t2 (cos 0.8), t5 orthogonal to everything in B.
    metric = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0],
                            [0.0, -1.0]]])
    x = torch.arange(7, dtype=torch.float32).reshape(1, 7, 1)  # token i carries the value i
    match = bipartite_soft_matching(metric, r=2, protected=1)
    merged, size = merge_weighted(match, x, None)
    # t1 merges into t4 ((1+4)/2 = 2.5), t3 into t2 ((3+2)/2 = 2.5); t5 stays.
    assert merged[0, :, 0].tolist() == [0.0, 5.0, 2.5, 2.5, 6.0]
    assert size[0, :, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 1.0]


def test_sizes_sum_and_weighted_mean_are_preserved_through_repeated_merges():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 6, generator=gen)
    metric = torch.randn(2, 50, 5, generator=gen)
    total = x.sum(dim=1)
    size = None
    for r in (10, 8, 6, 20):
        match = bipartite_soft_matching(metric, r, protected=1)
        metric = match.merge(metric)
        x, size = merge_weighted(match, x, size)
        assert torch.allclose(size.sum(dim=1), torch.full((2, 1), 50.0))
        # sum over tokens of size * value is the sum of the original tokens (mean preserved)
        torch.testing.assert_close((x * size).sum(dim=1), total, rtol=1e-5, atol=1e-4)
    assert torch.equal(size[:, 0], torch.ones(2, 1))  # the protected token never absorbed anything


def test_unmerge_gives_every_token_its_destination_value():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 4, generator=gen)
    metric = torch.randn(2, 13, 3, generator=gen)
    match = bipartite_soft_matching(metric, 4, protected=1)
    merged = match.merge(x, mode="mean")
    restored = match.unmerge(merged)
    assert restored.shape == x.shape
    for b in range(2):
        _, _, groups = reference_merge(x[b], metric[b], torch.ones(13), 4, 1)
        for out_index, members in enumerate(groups):
            for m in members:
                torch.testing.assert_close(restored[b, m], merged[b, out_index])


def test_source_tracks_groups_and_r_is_capped():
    gen = torch.Generator().manual_seed(5)
    metric = torch.randn(1, 9, 3, generator=gen)
    match = bipartite_soft_matching(metric, r=100, protected=1)
    assert match.r == 4  # set A has 4 tokens
    source = merge_source(match, initial_source(1, 9, metric.device, metric.dtype))
    _, _, groups = reference_merge(metric[0], metric[0], torch.ones(9), 100, 1)
    expected = torch.zeros(len(groups), 9)
    for out_index, members in enumerate(groups):
        expected[out_index, members] = 1.0
    assert torch.equal(source[0], expected)
    assert math.isclose(source.sum().item(), 9.0)
