"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package, as arrays and as pcc `.npz` files.

    apt-get install -y --no-install-recommends dataset-fashion-mnist

puts the original idx files in /usr/share/datasets/fashion-mnist/ (60k train, 10k test images, 28x28
grayscale). Images are scaled to [0, 1] and normalised with the training set's mean and std, laid out
as N x 1 x 28 x 28 float32, the layout the example CNN was trained and exported with.

    python examples/fashion_mnist.py --out out/   # writes fmnist_{calib,train,test}.npz for the CLI
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # of the training images, after scaling to [0, 1]
INPUT_NAME = "image"  # the exported model's input
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def available() -> bool:
    return all((DATA_DIR / name).exists() for pair in FILES.values() for name in pair)


def _read_idx(path: Path) -> np.ndarray:
    """The idx format: a magic number whose last byte is the rank, the dimensions, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    rank = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * rank], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * rank :], dtype=np.uint8).reshape(dims)


def load(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, 28, 28] float32 normalised, labels [N] int64) of `split` ("train" or "test")."""
    if not available():
        raise FileNotFoundError(f"Fashion-MNIST not found in {DATA_DIR}: apt-get install dataset-fashion-mnist")
    images_file, labels_file = FILES[split]
    images = _read_idx(DATA_DIR / images_file)[:limit].astype(np.float32) / 255.0
    labels = _read_idx(DATA_DIR / labels_file)[:limit].astype(np.int64)
    return ((images - MEAN) / STD)[:, None], labels


def calibration_split(samples: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of the training set: what pruning decisions are calibrated on."""
    images, labels = load("train")
    pick = np.random.default_rng(seed).choice(len(images), samples, replace=False)
    return images[pick], labels[pick]


def write_npz(out: Path) -> dict[str, Path]:
    """fmnist_calib.npz (512 training images), fmnist_train.npz and fmnist_test.npz, each with labels."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {"calib": calibration_split(), "train": load("train"), "test": load("test")}
    paths = {}
    for name, (images, labels) in splits.items():
        paths[name] = out / f"fmnist_{name}.npz"
        np.savez(paths[name], **{INPUT_NAME: images, "labels": labels})
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write Fashion-MNIST as pcc .npz files")
    parser.add_argument("--out", type=Path, default=Path("out"))
    for split, path in write_npz(parser.parse_args().out).items():
        print(f"{split:6s} {path}")
