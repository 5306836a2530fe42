"""2D bipartite matching (ToMe for SD) and key/value downsampling (ToDo) against slow loop references."""
import pytest
import torch

from accel.patches.tome.merge2d import bipartite_soft_matching_random2d, downsample_tokens, grid_destinations


def reference_groups(metric, h, w, sx, sy, r, offsets):
    """One image, with Python lists: the paper's 2D matching spelled out.

    offsets: [h // sy, w // sx] ints, the destination's position inside each window (row-major).
    Returns {destination position: [member positions]} and the list of kept sources.
    """
    dst = set()
    for i in range(h // sy):
        for j in range(w // sx):
            o = int(offsets[i][j])
            dst.add((i * sy + o // sx) * w + j * sx + o % sx)
    dst_list = sorted(dst)
    src_list = [p for p in range(h * w) if p not in dst]
    r = min(r, len(src_list)) if dst_list else 0

    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()  # cosine similarity of every pair of tokens

    best = {}
    for s in src_list:
        sims = [cos[s][d] for d in dst_list]
        k = max(range(len(sims)), key=lambda t: (sims[t], -t))
        best[s] = (sims[k], dst_list[k])
    ranked = sorted(src_list, key=lambda s: -best[s][0])
    groups = {d: [d] for d in dst_list}
    for s in ranked[:r]:
        groups[best[s][1]].append(s)
    kept = [s for s in src_list if s not in ranked[:r]]
    return groups, kept


def reference_merge_unmerge(x, groups, kept):
    """Each token replaced by the mean of its group: what unmerge(merge(x)) must give."""
    out = x.double().clone()
    for members in groups.values():
        mean = torch.stack([x[m].double() for m in members]).mean(0)
        for m in members:
            out[m] = mean
    return out


def offsets_for(h, w, sx, sy, seed, no_rand):
    if no_rand:
        return torch.zeros(h // sy, w // sx, dtype=torch.int64)
    return torch.randint(sx * sy, (h // sy, w // sx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h,w,sx,sy,r,no_rand", [
    (8, 8, 2, 2, 20, False), (8, 8, 2, 2, 20, True), (7, 10, 2, 3, 25, False),  # partial windows
    (6, 9, 3, 2, 100, False),  # r capped by the sources
    (5, 4, 2, 2, 0, False), (4, 6, 1, 1, 5, False),  # every token a destination: nothing to merge
])
def test_merge_unmerge_match_slow_reference(h, w, sx, sy, r, no_rand):
    batch, c, seed = 3, 6, h * 100 + w
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, h * w, c, generator=gen)
    metric = torch.randn(batch, h * w, c, generator=gen)
    match = bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, generator=torch.Generator().manual_seed(seed),
                                             no_rand=no_rand)
    offsets = offsets_for(h, w, sx, sy, seed, no_rand)
    merged = match.merge(x)
    n_unm = match.unm_idx.shape[1]
    for b in range(batch):
        groups, kept = reference_groups(metric[b], h, w, sx, sy, r, offsets)
        expected_r = h * w - len(groups) - len(kept)
        assert match.r == expected_r and merged.shape == (batch, h * w - expected_r, c)
        torch.testing.assert_close(match.unmerge(merged)[b].double(), reference_merge_unmerge(x[b], groups, kept))
        # merged layout: kept sources, then destinations (raster order) holding their group means
        dst_means = torch.stack([torch.stack([x[b, m] for m in groups[d]]).mean(0) for d in sorted(groups)])
        torch.testing.assert_close(merged[b, n_unm:], dst_means)
        kept_pos = match.a_idx[0, match.unm_idx[b]]
        assert sorted(kept_pos.tolist()) == kept
        torch.testing.assert_close(merged[b, :n_unm], x[b, kept_pos])


def test_unmerge_is_exact_inverse_of_a_permutation_at_r0():
    x = torch.randn(2, 48, 5)
    match = bipartite_soft_matching_random2d(x, 8, 6, 2, 2, 0, generator=torch.Generator().manual_seed(0))
    assert match.r == 0
    assert torch.equal(match.unmerge(match.merge(x)), x)


def test_destinations_one_per_window_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(7)
    a_idx, b_idx = grid_destinations(9, 11, 2, 3, gen)
    assert torch.equal(torch.get_rng_state(), state)  # our generator only
    assert b_idx.shape == (1, 3 * 5) and a_idx.shape == (1, 99 - 15)
    assert torch.equal(torch.cat([a_idx, b_idx], 1).sort().values, torch.arange(99)[None])
    windows = {((p // 11) // 3, (p % 11) // 2) for p in b_idx[0].tolist()}
    assert len(windows) == 15 and all(i < 3 and j < 5 for i, j in windows)
    _, fixed = grid_destinations(4, 4, 2, 2, no_rand=True)
    assert fixed.tolist() == [[0, 2, 8, 10]]  # top-left of every window


def reference_downsample(x, h, w, f, method):
    out = []
    for i in range(0, h, f):
        for j in range(0, w, f):
            if method == "nearest":
                out.append(x[:, i * w + j])
            else:
                cells = [x[:, a * w + b] for a in range(i, min(i + f, h)) for b in range(j, min(j + f, w))]
                out.append(torch.stack(cells).mean(0))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("method", ["nearest", "avg"])
@pytest.mark.parametrize("h,w,f", [(8, 8, 2), (7, 10, 2), (9, 6, 3), (5, 5, 1)])
def test_downsample_tokens_matches_loop(method, h, w, f):
    x = torch.randn(2, h * w, 4)
    out = downsample_tokens(x, h, w, f, method)
    assert out.shape == (2, -(-h // f) * -(-w // f), 4)
    torch.testing.assert_close(out, reference_downsample(x, h, w, f, method))
    if f == 1:
        assert out is x
