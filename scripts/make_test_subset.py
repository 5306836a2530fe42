"""Write assets/fashion_mnist_test_subset.npz: a fixed, seeded, class-balanced subset of the
Fashion-MNIST test split (200 images per class), so tests and benchmarks need no data package.

    python scripts/make_test_subset.py [--root DIR] [--per-class 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.pipelines.data import TEST_SUBSET, load_fashion_mnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TEST_SUBSET)
    args = parser.parse_args()

    images, labels = load_fashion_mnist("test", root=args.root)
    gen = torch.Generator().manual_seed(args.seed)
    chosen = []
    for cls in range(10):
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[: args.per_class]])
    index = torch.cat(chosen)
    index = index[torch.randperm(len(index), generator=gen)]  # classes interleaved
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images[index].numpy(), labels=labels[index].numpy().astype(np.uint8),
                        test_index=index.numpy().astype(np.int32))
    print(f"wrote {args.out} ({len(index)} images, {args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
