"""Pictures of what a method did: maps checked cell by cell against hand-made inputs, charts by their
pixels, and ``method_views`` on patched tiny ViTs and the built-in fashion-sd / fashion-dit."""
import dataclasses

import numpy as np
import pytest
import torch

import accel
from accel.eval.views import (BORDER, CHART_SIZE, HIGHLIGHT, TIMELINE_SIZE, depth_map_image, exit_chart,
                              method_views, palette, source_map, step_timeline, token_chart)
from accel.patches.base import MethodPatch
from accel.patches.early_exit.policy import confidence, first_exit
from accel.patches.early_exit.timm import backbone_exits
from accel.patches.settings import Settings
from tests.conftest import images, make_vit


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def centres(picture, grid):
    """``[gh, gw, 3]``: the pixel at the centre of each patch cell."""
    h, w = picture.shape[:2]
    rows = ((np.arange(grid[0]) + 0.5) * h / grid[0]).astype(int)
    cols = ((np.arange(grid[1]) + 0.5) * w / grid[1]).astype(int)
    return picture[rows[:, None], cols[None, :]]


def colours(cells):
    return {tuple(c) for c in cells.reshape(-1, 3)}


# -- maps -------------------------------------------------------------------------------------------
def test_source_map_colours_patches_by_the_token_they_ended_in():
    grid = (2, 3)
    groups = [1, 2, 2, 2, 1, 3]  # output token of each patch; token 0 is the CLS token alone
    source = torch.zeros(4, 1 + 6)
    source[0, 0] = 1
    for patch, token in enumerate(groups):
        source[token, 1 + patch] = 1
    picture = source_map(source, grid)
    assert picture.dtype == np.uint8 and picture.shape == (150, 225, 3)  # 2x3 cells of 75 px: the longer side >= 224
    cells = centres(picture, grid).reshape(6, 3)
    for a in range(6):
        for b in range(6):
            assert (tuple(cells[a]) == tuple(cells[b])) == (groups[a] == groups[b])
    assert np.array_equal(cells, palette(4)[groups])
    assert tuple(palette(4)[0]) not in colours(picture)  # the prefix token is not drawn
    # prefix columns are not patches: the same map without them
    assert np.array_equal(source_map(source[:, 1:], grid), picture)
    # borders between different tokens only: patch 0 | patch 1 differ, patch 1 | patch 2 do not
    assert np.array_equal(picture[37, 74], BORDER) and not np.array_equal(picture[37, 149], BORDER)
    assert np.array_equal(source_map(source, grid, borders=False)[37, 74], cells[0])


def test_source_map_over_an_image_blends_each_cell():
    source = torch.eye(4)  # four tokens, one patch each
    image = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)  # grey, [H, W]
    picture = source_map(source, (2, 2), image, alpha=0.6, borders=False)
    assert picture.shape == (224, 224, 3)  # 16 px upscaled 14 times
    big = np.repeat(np.repeat(image, 14, 0), 14, 1)
    expected = np.round(0.6 * palette(4)[[0, 1, 2, 3]].reshape(2, 2, 3).repeat(112, 0).repeat(112, 1)
                        + 0.4 * big[..., None])
    assert np.array_equal(picture, expected.astype(np.uint8))


def test_depth_map_image_spans_the_colormap_from_0_to_blocks():
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    picture = depth_map_image(torch.tensor([[0, 2], [4, 1]]), blocks=4)
    cells = centres(picture, (2, 2))
    assert np.array_equal(cells[0, 0], np.round(np.array(viridis(0.0)[:3]) * 255))
    assert np.array_equal(cells[1, 0], np.round(np.array(viridis(1.0)[:3]) * 255))
    assert np.array_equal(cells[0, 1], np.round(np.array(viridis(0.5)[:3]) * 255))


# -- charts -----------------------------------------------------------------------------------------
def runs(row):
    """(start, stop) of each stretch of non-white pixels in a pixel row ``[W, 3]``."""
    coloured = (row < 245).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], coloured.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_step_timeline_draws_full_steps_darker_than_cached_ones():
    picture = step_timeline(6, [0, 3])
    assert picture.shape == (TIMELINE_SIZE[1], TIMELINE_SIZE[0], 3) and picture.dtype == np.uint8
    row = picture[picture.shape[0] // 2]
    cells = runs(row)
    assert len(cells) == 6
    luminance = [row[a:b].astype(float).mean() for a, b in cells]
    assert max(luminance[i] for i in (0, 3)) < min(luminance[i] for i in (1, 2, 4, 5))


def test_step_timeline_bars_are_as_high_as_the_tokens_computed():
    picture = step_timeline(4, [0], tokens_per_step=[64, 16, 48, 32], tokens=64)
    bottom = picture.shape[0] * 2 // 3  # a row every bar reaches
    heights = []
    for a, b in runs(picture[bottom])[-4:]:  # the last four stretches: the bars (left: the y labels)
        column = picture[:, (a + b) // 2]
        heights.append(int(((column < 245).any(axis=1)).sum()))
    assert heights[1] < heights[3] < heights[2] < heights[0]
    assert heights[2] / heights[0] == pytest.approx(0.75, abs=0.05)


def test_exit_chart_and_token_chart_sizes_and_highlight():
    picture = exit_chart([1, 3], [2, 1], 5, 6, highlight=1)
    assert picture.shape == (CHART_SIZE[1], CHART_SIZE[0], 3) and picture.dtype == np.uint8
    orange = tuple(int(HIGHLIGHT[i:i + 2], 16) for i in (1, 3, 5))
    assert orange in colours(picture)
    assert orange not in colours(exit_chart([1, 3], [2, 1], 5, 6))
    assert token_chart([65, 57], [57, 49]).shape == (CHART_SIZE[1], CHART_SIZE[0], 3)


# -- method_views on ViTs -----------------------------------------------------------------------------
def run(model, batch=2):
    with torch.no_grad():
        return model(images(batch))


def test_tome_with_traced_sources_shows_one_colour_per_output_token():
    model = make_vit()  # 8x8 patches and a CLS token, 4 blocks
    accel.patch(model, tome=accel.ToMe(r=8, trace_source=True))
    run(model)
    source = accel.tome.get_source(model)
    for index in (0, 1):
        (caption, picture), = method_views(model, index=index)
        tokens = int((source[index, :, 1:].amax(dim=1) > 0).sum())
        assert tokens == 32  # 64 patches, 8 merged in each of 4 blocks
        assert len(colours(centres(picture, (8, 8)))) == tokens
        assert f"image {index} ended in {tokens} tokens" in caption
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    (_, over), = method_views(model, image, index=1)
    assert over.shape == (224, 224, 3) and not np.array_equal(over, picture)
    with pytest.raises(IndexError, match="batch of 2"):
        method_views(model, index=2)


def test_tome_without_tracing_charts_tokens_per_block():
    model = make_vit()
    accel.patch(model, tome=8)
    assert method_views(model) == []  # patched but not run yet
    run(model)
    (caption, picture), = method_views(model)
    assert "32 tokens merged away over 4 blocks (65 → 33" in caption
    assert picture.shape == (CHART_SIZE[1], CHART_SIZE[0], 3)


@pytest.mark.parametrize("method", ["avit", "token_exit"])
def test_depth_views_draw_the_patches_depths(method):
    model = make_vit()
    if method == "avit":
        accel.patch(model, avit=accel.AViT(gamma=3.0, beta=1.0, mode="remove"))
    else:
        with torch.no_grad():  # a threshold that stops about half the patches after block 0
            t = model.norm_pre(model._pos_embed(model.patch_embed(images(3))))
            threshold = float(accel.token_exit.relative_update(model.blocks[0](t), t)[:, 1:].median())
        accel.patch(model, token_exit=threshold)
    run(model, batch=3)
    depth = getattr(accel, method).depth_map(model)
    (caption, picture), = method_views(model, index=2)
    assert np.array_equal(picture, depth_map_image(depth[2], 4))
    assert "patch of image 2 " in caption and f"(mean {depth[2].float().mean():.1f} of 4;" in caption
    assert len(np.unique(depth[2])) > 1  # the settings halt patches at different depths


def make_heads(blocks=(0, 1, 2), seed=3, scale=6.0):
    torch.manual_seed(seed)
    heads = accel.early_exit.ExitHeads(list(blocks), dim=48, num_classes=10, pool="token")
    with torch.no_grad():
        for head in heads.heads:
            head.fc.weight.mul_(scale)  # spread confidences so that images leave at different blocks
    return heads.eval()


def test_early_exit_view_names_the_block_each_image_left_at():
    model, heads, batch = make_vit(), make_heads(), 6
    x = images(batch)
    with torch.no_grad():
        pooled, _ = backbone_exits(model, x, heads)
        conf = torch.stack([confidence(heads.heads[k](p)) for k, p in enumerate(pooled)])  # [K, B]
    thresholds = conf.median(dim=1).values  # about half the images pass each head
    first = first_exit(conf, thresholds)  # direct: the first head each image passes, 3 for none
    accel.patch(model, early_exit=accel.EarlyExit(heads, thresholds=thresholds.tolist(), criterion="max_prob"))
    with torch.no_grad():
        model(x)
    assert len(set(first.tolist())) > 1
    for index in range(batch):
        (caption, picture), = method_views(model, index=index)
        k = int(first[index])
        expected = f"left after block {heads.blocks[k] + 1} of 4" if k < 3 else "ran all 4 blocks"
        assert f"image {index} {expected}" in caption
        assert picture.shape == (CHART_SIZE[1], CHART_SIZE[0], 3)


def test_evit_charts_tokens_kept():
    model = make_vit()
    accel.patch(model, evit=accel.EViT(keep_rate=0.5))
    run(model)
    (caption, _), = method_views(model)
    info = accel.describe(model)["methods"]["evit"]["last_call"]
    assert caption.startswith("EViT: kept 50%") and f"{info['tokens_out'][-1]} tokens per image" in caption


@dataclasses.dataclass(frozen=True)
class Nothing(Settings):
    METHOD = "nothing"
    EXPECTED = "a dict of settings"


class NothingOnHead(MethodPatch):
    """A user's method: counts calls of the head and reports them."""

    SUPPORTED = "timm models with a head"
    calls = 0

    @classmethod
    def matches(cls, obj):
        return hasattr(obj, "head")

    def _install(self):
        def count(module, call_next, x):
            self.calls += 1
            return call_next(x)
        self.hooks.add(self.target.head, count)

    def last_call(self):
        return {"calls": self.calls} if self.calls else None


def test_unpatched_models_and_unknown_methods_give_no_views():
    model = make_vit()
    run(model)
    assert method_views(model) == []
    accel.register(accel.Method("nothing", Nothing, (NothingOnHead,)))
    try:
        accel.patch(model, nothing={}, tome=accel.ToMe(r=8, trace_source=True))
        run(model)
        views = method_views(model)
        assert [caption.split(":")[0] for caption, _ in views] == ["ToMe"]
    finally:
        accel.unpatch(model)
        accel.unregister("nothing")


# -- method_views on the built-in diffusion pipelines ----------------------------------------------------
def test_deepcache_and_tome_on_fashion_sd():
    import accel.pipelines

    pipe = accel.pipelines.load("fashion-sd")
    accel.patch(pipe, deepcache=3, tome=0.5)
    with torch.inference_mode():
        pipe(prompt="a photo of a bag", num_inference_steps=6, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    full = accel.describe(pipe)["methods"]["deepcache"]["last_call"]["full_steps"]
    views = dict((caption.split(":")[0], (caption, picture)) for caption, picture in method_views(pipe))
    assert set(views) == {"DeepCache", "ToMe"}
    caption, picture = views["DeepCache"]
    assert len(full) == 2 and "DeepCache: 2 of 6 steps ran the full UNet" in caption
    assert picture.shape == (TIMELINE_SIZE[1], TIMELINE_SIZE[0], 3)
    assert "tokens at 16×16" in views["ToMe"][0]


def test_region_cache_on_fashion_dit():
    import accel.pipelines

    pipe = accel.pipelines.load("fashion-dit")
    accel.patch(pipe, region_cache=accel.RegionCache(ratio=0.5, warmup=2, refresh=0))
    with torch.inference_mode():
        pipe(class_labels=[7], num_inference_steps=4, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    (timeline_caption, timeline), (map_caption, counts) = method_views(pipe)
    assert timeline_caption == ("RegionCache: 2 of 4 steps computed all 64 patch tokens; "
                                "the other 2 recomputed 50% of them")
    assert timeline.shape == (TIMELINE_SIZE[1], TIMELINE_SIZE[0], 3)
    computed = accel.describe(pipe)["methods"]["region_cache"]["last_call"]["computed_steps"]
    assert np.array_equal(counts, depth_map_image(torch.tensor(computed[0]), 4))
    assert "image 0" in map_caption
