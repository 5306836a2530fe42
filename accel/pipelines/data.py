"""Fashion-MNIST (Xiao et al. 2017, MIT licence): the data the built-in models are trained on.

Sources, in order: a folder given by the caller or ``$ACCEL_FASHION_MNIST``; Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``); torchvision's
download (only where a network is reachable, never in tests or the default run). A fixed,
seeded test subset ships in ``assets/`` so tests and benchmarks need none of these.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "FASHION_CLASSES",
    "ASSETS",
    "read_idx",
    "load_fashion_mnist",
    "load_test_subset",
    "prompt_for",
]

FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# The repository's assets/ folder (the package is installed editable by `make`); override with
# $ACCEL_ASSETS when the package is installed elsewhere.
ASSETS = Path(os.environ.get("ACCEL_ASSETS", Path(__file__).resolve().parents[2] / "assets"))
TEST_SUBSET = ASSETS / "fashion_mnist_test_subset.npz"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def prompt_for(label: int) -> str:
    """The caption of a class: "a photo of a sneaker"."""
    return f"a photo of a {FASHION_CLASSES[label]}"


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Parse an IDX file (gzipped or not): the format MNIST and Fashion-MNIST ship in."""
    path = Path(path)
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _find_root(root: Optional[Union[str, Path]]) -> Optional[Path]:
    for candidate in (root, os.environ.get("ACCEL_FASHION_MNIST"), DEBIAN_DIR):
        if candidate and all((Path(candidate) / f).exists() for f in _FILES["test"]):
            return Path(candidate)
    return None


def load_fashion_mnist(split: str = "train", root: Optional[Union[str, Path]] = None,
                       download: bool = False, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the ``train`` or ``test`` split; only
    its first ``limit`` images when given (None or 0: all)."""
    images, labels = _read_split(split, root, download)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def _read_split(split: str, root: Optional[Union[str, Path]], download: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    folder = _find_root(root)
    if folder is not None:
        images, labels = (read_idx(folder / name) for name in _FILES[split])
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    if not download:
        raise FileNotFoundError(
            "Fashion-MNIST not found: pass root=, set ACCEL_FASHION_MNIST, install Debian's "
            "dataset-fashion-mnist, or pass download=True (torchvision, needs a network)"
        )
    from torchvision.datasets import FashionMNIST

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "accel" / "fashion-mnist"
    dataset = FashionMNIST(str(cache), train=split == "train", download=True)
    return dataset.data.clone(), dataset.targets.clone()


def load_test_subset() -> Tuple[torch.Tensor, torch.Tensor]:
    """The shipped, seeded subset of the test split: ``(uint8 [N, 28, 28], int64 [N])``."""
    with np.load(TEST_SUBSET) as data:
        return torch.from_numpy(data["images"].copy()), torch.from_numpy(data["labels"].astype(np.int64))
