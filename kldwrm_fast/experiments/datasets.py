"""MNIST-format datasets for the study, never downloaded: the embedded sample, Debian's Fashion-MNIST, or
any directory with the four standard IDX files.

Every loader returns ``Split(train_x, train_y, test_x, test_y)``: images as float32 (N, 1, 28, 28) in [0, 1]
and labels as int64 (N,).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SAMPLE_TRAIN = 4000


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the problem."""


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode IDX bytes (uint8 payload) into an array; ``name`` labels errors."""
    if len(data) < 4:
        raise DatasetError(f"{name}: truncated file ({len(data)} bytes, no IDX header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DatasetError(
            f"{name}: wrong magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            "(expected 0x00000801 for labels or 0x00000803 for images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        problem = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise DatasetError(
            f"{name}: {problem}: {len(data) - header} payload bytes for shape {shape} ({expected} expected)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str) -> np.ndarray:
    """Read a raw or gzipped IDX file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error.strerror})") from error
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise DatasetError(f"{path}: corrupt gzip data ({error})") from error
    return parse_idx(data, path)


def _pair(images: np.ndarray, labels: np.ndarray, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{name}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise DatasetError(f"{name}: labels must be 0–9, found {labels.max()}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _find(directory: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise DatasetError(f"{os.path.join(directory, stem)}[.gz]: not found")


def load_idx_directory(directory: str) -> Split:
    """The four standard MNIST IDX files (gzipped or not) in ``directory``."""
    arrays = {key: read_idx(_find(directory, stem)) for key, stem in IDX_NAMES.items()}
    train = _pair(arrays["train_images"], arrays["train_labels"], directory)
    test = _pair(arrays["test_images"], arrays["test_labels"], directory)
    return Split(*train, *test)


def load_mnist_sample() -> Split:
    """The embedded 5,000 real MNIST images, shuffled with a fixed seed: 4,000 train, 1,000 test."""
    folder = resources.files("kldwrm_fast.experiments") / "data"
    images = parse_idx(
        gzip.decompress((folder / "mnist-sample-images-idx3-ubyte.gz").read_bytes()), "mnist-sample images"
    )
    labels = parse_idx(
        gzip.decompress((folder / "mnist-sample-labels-idx1-ubyte.gz").read_bytes()), "mnist-sample labels"
    )
    x, y = _pair(images, labels, "mnist-sample")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:SAMPLE_TRAIN], order[SAMPLE_TRAIN:]
    return Split(x[train], y[train], x[test], y[test])


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> Split:
    """Full Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package."""
    if not os.path.isdir(directory):
        raise DatasetError(
            f"{directory}: not found; install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' "
            "(Debian/Ubuntu), or pass --dataset idx:DIR with the four IDX files"
        )
    return load_idx_directory(directory)


def load_dataset(spec: str) -> Split:
    """``"mnist-sample"``, ``"fashion-mnist"`` or ``"idx:DIR"``."""
    if spec == "mnist-sample":
        return load_mnist_sample()
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    if spec.startswith("idx:") and len(spec) > 4:
        return load_idx_directory(spec[4:])
    raise ValueError(f"Invalid dataset: {spec!r}; expected 'mnist-sample', 'fashion-mnist' or 'idx:DIR'")
