"""Report plots (matplotlib PNGs) and the labelled image grid (PIL)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from accel.eval.grid import LEFT_MARGIN, TITLE_HEIGHT, TOP_MARGIN, labelled_grid
from accel.eval.plot import DPI, FIGSIZE, front_rows, line_plot, pareto_front, tradeoff_plot

PLOT_SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def brute_front(xs, ys, maximize):
    """The definition, literally: i is kept unless some j is >= in both and > in one."""
    sx, sy = (1 if maximize[0] else -1), (1 if maximize[1] else -1)
    keep = []
    for i in range(len(xs)):
        beaten = False
        for j in range(len(xs)):
            ge = sx * xs[j] >= sx * xs[i] and sy * ys[j] >= sy * ys[i]
            gt = sx * xs[j] > sx * xs[i] or sy * ys[j] > sy * ys[i]
            beaten = beaten or (ge and gt)
        if not beaten:
            keep.append(i)
    return sorted(keep, key=lambda i: (xs[i], i))


@pytest.mark.parametrize("maximize", [(True, True), (True, False), (False, True), (False, False)])
def test_pareto_front_matches_the_definition_with_ties(maximize):
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 12)
        # Few distinct values, so equal x, equal y and duplicate points are common.
        xs = [float(rng.randint(0, 4)) for _ in range(n)]
        ys = [rng.randint(0, 4) / 2 for _ in range(n)]
        assert pareto_front(xs, ys, maximize=maximize) == brute_front(xs, ys, maximize), (xs, ys)


def test_pareto_front_small_cases():
    assert pareto_front([], []) == []
    assert pareto_front([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == [0, 1, 2]  # a trade-off: all kept
    assert pareto_front([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], maximize=(True, False)) == [2]
    assert pareto_front([2.0, 1.0, 2.0], [5.0, 5.0, 5.0]) == [0, 2]  # duplicates both kept, sorted by x
    with pytest.raises(ValueError, match="length"):
        pareto_front([1.0], [1.0, 2.0])


ROWS = [
    dict(settings="unpatched", speedup=1.0, fid=None),  # the baseline: x only, skipped
    dict(settings="a", speedup=1.5, fid=20.0, fid_low=19.0, fid_high=21.5),
    dict(settings="b", speedup=2.0, fid=25.0, fid_low=23.0, fid_high=27.0),
    dict(settings="c", speedup=3.0, fid=30.0, fid_low=None, fid_high=None),
    dict(settings="d", speedup=1.2, fid=28.0, fid_low=26.0, fid_high=30.0),
]


def test_front_rows_follow_the_direction_of_quality():
    lower = [row["settings"] for row in front_rows(ROWS, y="fid", higher_is_better=False)]
    higher = [row["settings"] for row in front_rows(ROWS, y="fid", higher_is_better=True)]
    assert lower == ["a", "b", "c"]  # faster costs FID; d is slower and worse than a
    assert higher == ["c"]  # c is fastest and has the highest value


def pixels(path):
    image = Image.open(path)
    assert image.format == "PNG" and image.size == PLOT_SIZE
    return np.asarray(image.convert("RGB"))


def test_tradeoff_plot_writes_a_png_and_marks_the_front(tmp_path):
    kw = dict(y="fid", ylabel="FID", title="FID against speed", interval=("fid_low", "fid_high"))
    low = tradeoff_plot(ROWS, tmp_path / "sub" / "low.png", higher_is_better=False, **kw)
    high = tradeoff_plot(ROWS, tmp_path / "high.png", higher_is_better=True, **kw)
    assert low == tmp_path / "sub" / "low.png"
    # Same points and labels; only the front (line and rings) differs.
    assert (pixels(low) != pixels(high)).any(axis=-1).sum() > 100
    with pytest.raises(ValueError, match="'clip'"):
        tradeoff_plot(ROWS, tmp_path / "none.png", y="clip", ylabel="CLIP", title="t")
    assert not (tmp_path / "none.png").exists()


def test_line_plot_writes_a_png(tmp_path):
    path = line_plot({"a": [(2.0, 1.0), (1.0, 2.0)], "b": [(1.5, 1.5)]}, tmp_path / "line.png",
                     title="t", xlabel="x", ylabel="y")
    assert (pixels(path) < 128).any()  # something dark was drawn
    with pytest.raises(ValueError, match="no points"):
        line_plot({"a": []}, tmp_path / "empty.png", title="t", xlabel="x", ylabel="y")


def test_labelled_grid_layout_and_cells(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, h, w, scale = 3, 5, 7, 3
    grey = torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    one = torch.randint(0, 256, (n, 1, h, w), dtype=torch.uint8, generator=g)
    labels = ["a cat", "a prompt far too long to fit in the margin " * 4, "a dog"]
    path = labelled_grid({"unpatched": grey, "tome 0.5": rgb, "deepcache 3": one}, tmp_path / "d" / "g.png",
                         row_labels=labels, scale=scale, title="a grid")
    image = np.asarray(Image.open(path))
    top = TOP_MARGIN + TITLE_HEIGHT
    assert image.shape == (top + n * h * scale, LEFT_MARGIN + 3 * w * scale, 3)

    # Row 1 of the RGB column, exactly: nearest-neighbour upscaling repeats each pixel scale x scale.
    x0, y0 = LEFT_MARGIN + w * scale, top + h * scale
    cell = image[y0:y0 + h * scale, x0:x0 + w * scale]
    expected = rgb[1].permute(1, 2, 0).repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
    assert np.array_equal(cell, expected)
    grey_cell = image[top:top + h * scale, LEFT_MARGIN:LEFT_MARGIN + w * scale]
    assert np.array_equal(grey_cell[..., 0], grey[0].repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy())
    assert (grey_cell[..., 0] == grey_cell[..., 2]).all()

    # Text was drawn in the label margin, in the header band and in the title band.
    assert (image[top:, :LEFT_MARGIN] < 128).any()
    assert (image[TITLE_HEIGHT:top, LEFT_MARGIN:] < 128).any()
    assert (image[:TITLE_HEIGHT] < 128).any()


def test_labelled_grid_without_title_has_no_title_band(tmp_path):
    images = torch.zeros(2, 4, 4, dtype=torch.uint8)
    path = labelled_grid({"s": images}, tmp_path / "g.png", row_labels=["a", "b"], scale=1)
    assert Image.open(path).size == (LEFT_MARGIN + 4, TOP_MARGIN + 2 * 4)


def test_labelled_grid_refuses_bad_input(tmp_path):
    ok = torch.zeros(2, 4, 4, dtype=torch.uint8)
    out = tmp_path / "g.png"
    with pytest.raises(ValueError, match="columns"):
        labelled_grid({"a": ok, "b": torch.zeros(2, 4, 5, dtype=torch.uint8)}, out, row_labels=["x", "y"])
    with pytest.raises(ValueError, match="columns"):
        labelled_grid({"a": ok, "b": torch.zeros(3, 4, 4, dtype=torch.uint8)}, out, row_labels=["x", "y"])
    with pytest.raises(ValueError, match="columns"):
        labelled_grid({}, out, row_labels=[])
    with pytest.raises(ValueError, match="columns"):
        labelled_grid({"a": torch.zeros(2, 2, 4, 4, dtype=torch.uint8)}, out, row_labels=["x", "y"])
    with pytest.raises(TypeError, match="columns.*uint8"):
        labelled_grid({"a": ok.float()}, out, row_labels=["x", "y"])
    with pytest.raises(ValueError, match="row_labels"):
        labelled_grid({"a": ok}, out, row_labels=["x"])
    with pytest.raises(ValueError, match="scale"):
        labelled_grid({"a": ok}, out, row_labels=["x", "y"], scale=0)
    assert not out.exists()


def test_tune_marks_draw_the_budget_and_the_choice(tmp_path):
    import numpy as np
    from PIL import Image

    from accel.eval.outputs import plot_record

    rows = [{"settings": "unpatched", "speedup": 1.0, "accuracy_drop": 0.0},
            {"settings": "tome=2", "speedup": 1.3, "accuracy_drop": 0.1},
            {"settings": "tome=4", "speedup": 1.8, "accuracy_drop": 1.0}]
    plain = tradeoff_plot(rows, tmp_path / "plain.png", y="accuracy_drop", ylabel="drop", title="t",
                          higher_is_better=False)
    marked = tradeoff_plot(rows, tmp_path / "marked.png", y="accuracy_drop", ylabel="drop", title="t",
                           higher_is_better=False, budget=0.5, chosen="tome=2")
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (plain, marked))
    assert a.shape == b.shape and (a != b).any(axis=-1).sum() > 200  # a line across the plot and a star
    # a tune record gets the plot of its budget's metric, with the marks
    record = {"meta": {"model": "m", "tune": {"metric": "accuracy_drop", "bound": 0.5, "chosen": "tome=2"}},
              "rows": rows}
    paths = plot_record(record, tmp_path / "tune")
    assert [p.name for p in paths] == ["speedup-vs-accuracy_drop.png"]
    label = "top-1 accuracy drop (points)"
    same = tradeoff_plot(rows, tmp_path / "same.png", y="accuracy_drop", ylabel=label,
                         title=f"m: speedup against {label}", higher_is_better=False, budget=0.5, chosen="tome=2")
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(same)))  # budget and star drawn
