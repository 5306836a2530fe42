import gzip

import numpy as np
import pytest
import torch

from accel.pipelines import FASHION_CLASSES, load_fashion_mnist, load_test_subset, prompt_for
from accel.pipelines.data import read_idx


def write_idx(path, array):
    """IDX: two zero bytes, type 0x08 (uint8), ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake_dataset(folder, n_train=64, n_test=32, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def test_read_idx_known_bytes(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")


def test_load_from_folder_and_errors(tmp_path, monkeypatch):
    make_fake_dataset(tmp_path)
    images, labels = load_fashion_mnist("test", root=tmp_path)
    assert images.shape == (32, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(32)] and labels.dtype == torch.int64
    first, first_labels = load_fashion_mnist("test", root=tmp_path, limit=5)
    assert torch.equal(first, images[:5]) and torch.equal(first_labels, labels[:5])
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("val", root=tmp_path)
    monkeypatch.setattr("accel.pipelines.data.DEBIAN_DIR", tmp_path / "missing")
    monkeypatch.delenv("ACCEL_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train")


def test_shipped_test_subset_is_balanced():
    images, labels = load_test_subset()
    assert images.shape == (2000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [200] * 10
    assert images.float().mean() > 50  # real clothing pictures, not blanks


def test_class_names_and_prompts():
    assert len(FASHION_CLASSES) == 10 and FASHION_CLASSES[7] == "sneaker"
    assert prompt_for(7) == "a photo of a sneaker"  # the template, "a photo of a {name}"
