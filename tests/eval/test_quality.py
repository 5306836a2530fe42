"""Image-quality metrics: PSNR/SSIM against hand and slow references, FID against torchmetrics and
scipy, the bootstrap against an explicit loop."""
import math

import numpy as np
import pytest
import torch

from accel.eval.fid import inception_features
from accel.eval.quality import PSNR_CAP_DB, FidEstimate, fid_interval, frechet_distance, psnr_per_image, ssim_per_image


def _noisy_pair(shape, seed, noise=30):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g)
    y = (x + torch.randint(-noise, noise + 1, shape, generator=g)).clamp(0, 255)
    return x.to(torch.uint8), y.to(torch.uint8)


# ---- PSNR ----

def test_psnr_matches_hand_computed_values_grey_and_capped_when_identical():
    reference = torch.zeros(3, 2, 2, dtype=torch.uint8)
    images = reference.clone()
    images[0, 0, 1] = 10  # squared errors 100 over 4 pixels: MSE 25
    images[2] = 255  # MSE 255^2: 0 dB
    expected = torch.tensor([10 * math.log10(255 ** 2 / 25), PSNR_CAP_DB, 0.0], dtype=torch.float64)
    torch.testing.assert_close(psnr_per_image(images, reference), expected, rtol=0, atol=1e-5)


def test_psnr_per_image_on_colour_images_and_negative_differences():
    reference = torch.full((2, 3, 2, 2), 100, dtype=torch.uint8)
    images = reference.clone()
    images[0, 1, 0, 0] = 110  # +10
    images[0, 2, 1, 1] = 97  # -3 (uint8 arithmetic would wrap to 253): SSE 109 over 12 values
    values = psnr_per_image(images, reference)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(10 * math.log10(255 ** 2 / (109 / 12)), abs=1e-5)
    assert values[1].item() == PSNR_CAP_DB


def test_psnr_refuses_mismatched_shapes_and_non_uint8():
    x = torch.zeros(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reference"):
        psnr_per_image(x, torch.zeros(2, 4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images"):
        psnr_per_image(x.float(), x.float())


# ---- SSIM ----

def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of float64 ``[C, H, W]`` images, one window position at a time.

    Convention: every position where the 11x11 window (gaussian, sigma 1.5) lies inside the image,
    as Wang et al.'s MATLAB code ('valid' filtering). torchmetrics 1.9 itself reflect-pads by 5 and
    averages its whole H x W map (Lightning-AI/torchmetrics#2721; earlier versions cropped that map to
    this valid region): ssim_per_image crops the map torchmetrics returns, so matches this in both.
    """
    offsets = np.arange(11) - 5
    g = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for c in range(x.shape[0]):
        for r in range(x.shape[1] - 10):
            for q in range(x.shape[2] - 10):
                px, py = x[c, r:r + 11, q:q + 11], y[c, r:r + 11, q:q + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 3, 16, 13)])
def test_ssim_matches_a_window_by_window_reference(shape):
    x, y = _noisy_pair(shape, seed=1)
    ours = ssim_per_image(x, y)
    x4, y4 = (t.double().numpy().reshape(shape[0], -1, *shape[-2:]) for t in (x, y))
    expected = torch.tensor([_reference_ssim(a, b) for a, b in zip(x4, y4)])
    assert 0.3 < expected.min() and expected.max() < 0.99  # a non-trivial similarity
    torch.testing.assert_close(ours.double(), expected.double(), rtol=0, atol=1e-5)


def test_ssim_of_identical_images_is_one_and_small_images_are_refused():
    x, _ = _noisy_pair((3, 3, 12, 12), seed=2)
    torch.testing.assert_close(ssim_per_image(x, x), torch.ones(3), rtol=0, atol=1e-6)
    small = torch.zeros(1, 10, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_image(small, small)
    with pytest.raises(ValueError, match="reference"):
        ssim_per_image(x, x[:2])


# ---- Frechet distance ----

def _features(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(m, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) / 3
    return a, b


class _PassThrough(torch.nn.Module):
    """torchmetrics' ``feature`` module that returns its input. ``num_features`` must be set: without
    it torchmetrics calls the module on a random uint8 [1, 3, 299, 299] image to read the count."""

    num_features = 16

    def forward(self, x):
        return x


@pytest.mark.parametrize("n, m", [(40, 25), (7, 10)])  # more rows than d (QR path) and fewer (rank-deficient)
def test_frechet_distance_equals_torchmetrics(n, m):
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _features(n, m, 16, seed=3)
    metric = FrechetInceptionDistance(feature=_PassThrough())
    metric.update(a, real=True)  # the counts come from len(imgs): here the feature rows
    metric.update(b, real=False)
    expected = metric.compute().item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_equals_the_formula_with_a_matrix_square_root():
    linalg = pytest.importorskip("scipy.linalg")
    a, b = _features(40, 25, 16, seed=4)
    sa, sb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)  # unbiased
    mean_term = np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2)
    expected = mean_term + np.trace(sa) + np.trace(sb) - 2 * np.trace(linalg.sqrtm(sa @ sb)).real
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_and_shifted():
    a, _ = _features(30, 2, 16, seed=5)
    threads = torch.get_num_threads()
    assert abs(frechet_distance(a, a)) < 1e-9 * a.var(0).sum().item()
    assert torch.get_num_threads() == threads  # the SVD's one-thread scope is undone
    shift = torch.linspace(-1, 2, 16, dtype=torch.float64)
    # equal covariances: the trace terms cancel and only |shift|^2 is left
    assert frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)


def test_frechet_distance_refuses_too_few_rows_and_mismatched_widths():
    a, b = _features(5, 5, 4, seed=6)
    with pytest.raises(ValueError, match="a:"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="b:"):
        frechet_distance(a, b[:1])
    with pytest.raises(ValueError, match="b:"):
        frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="a:"):
        frechet_distance(a[0], b)


# ---- bootstrap interval ----

def _slow_interval(a, b, resamples, level, seed, resample_b):
    """The bootstrap as its docstring says, one resample at a time, re-centred on the estimate."""
    n, m = len(a), len(b)
    g = torch.Generator().manual_seed(seed)
    ia = torch.randint(n, (resamples, n), generator=g)
    jb = torch.randint(m, (resamples, m), generator=g)
    values = [frechet_distance(a[ia[r]], b[jb[r]] if resample_b else b) for r in range(resamples)]
    bias = np.mean(values) - frechet_distance(a, b)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) - bias
    return max(0.0, low), high


@pytest.mark.parametrize("n, m", [(12, 30), (30, 12)])  # a fixed b wider than d is kept as its QR factor
@pytest.mark.parametrize("resample_b", [True, False])
def test_fid_interval_equals_an_explicit_bootstrap_loop(n, m, resample_b):
    a, b = _features(n, m, 16, seed=7)
    est = fid_interval(a, b, resamples=25, level=0.9, seed=11, resample_b=resample_b)
    low, high = _slow_interval(a, b, 25, 0.9, 11, resample_b)
    assert est.low == pytest.approx(low, rel=1e-9)
    assert est.high == pytest.approx(high, rel=1e-9)
    assert est.value == frechet_distance(a, b)
    assert est.low < est.value < est.high  # re-centred: the raw quantiles of small sets lie above it


def test_fid_interval_is_seeded_ordered_and_narrower_with_a_fixed_reference():
    a, b = _features(40, 40, 16, seed=8)
    est = fid_interval(a, b, resamples=60, level=0.8, seed=1)
    assert est == fid_interval(a, b, resamples=60, level=0.8, seed=1)
    assert est != fid_interval(a, b, resamples=60, level=0.8, seed=2)
    assert isinstance(est, FidEstimate) and est.low <= est.high
    assert (est.resamples, est.level, est.n, est.m) == (60, 0.8, 40, 40)
    fixed = fid_interval(a, b, resamples=60, level=0.8, seed=1, resample_b=False)
    assert fixed.high - fixed.low <= est.high - est.low  # one source of variation fewer (holds on this data)


def test_fid_interval_refuses_bad_settings():
    a, b = _features(5, 5, 4, seed=9)
    with pytest.raises(ValueError, match="resamples"):
        fid_interval(a, b, resamples=0)
    with pytest.raises(ValueError, match="level"):
        fid_interval(a, b, level=1.0)


# ---- features ----

class _StandInFeatures(torch.nn.Module):
    """In place of InceptionFeatures (tests/eval/test_fid.py checks that one): records its batches."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, images):
        self.batches.append(tuple(images.shape))
        return images.float().mean((1, 2, 3))[:, None] * torch.arange(2048.0)


def test_inception_features_batches_grey_images_and_returns_float64():
    images = torch.randint(0, 256, (7, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net = _StandInFeatures()
    feats = inception_features(images, features=net, batch=3, progress="features")
    assert net.batches == [(3, 1, 5, 5), (3, 1, 5, 5), (1, 1, 5, 5)]
    assert feats.dtype == torch.float64 and feats.shape == (7, 2048)
    torch.testing.assert_close(feats, _StandInFeatures()(images.unsqueeze(1)).double())
    assert inception_features(images[:0], features=net).shape == (0, 2048)
    with pytest.raises(ValueError, match="images"):
        inception_features(images.float(), features=net)
