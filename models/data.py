"""Datasets as canonical NCHW float32 inputs and int64 labels: synthetic, digits, mnist, fashion_mnist, cifar10.

Files are read from a data folder (--data-dir, $NNCOMPARE_DATA, or ~/.cache/nncompare); missing files are
downloaded with MD5 verification when the network allows, else one message says where to put them.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .spec import ModelSpec


class DataError(RuntimeError):
    """A dataset that cannot be had or does not fit the model."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    def for_spec(self, spec: ModelSpec) -> "Dataset":
        """The same data shaped to the model's input (e.g. 1x8x8 digits flattened for a dense net)."""
        per_sample = int(np.prod(self.x_train.shape[1:]))
        if per_sample != int(np.prod(spec.input_shape)):
            raise DataError(f"dataset {self.name!r} has samples of shape {self.x_train.shape[1:]}, "
                            f"model {spec.name!r} expects {spec.input_shape}")
        if spec.num_classes not in (self.classes, 1) or (spec.num_classes == 1 and self.classes != 2):
            raise DataError(f"dataset {self.name!r} has {self.classes} classes, "
                            f"model {spec.name!r} outputs {spec.num_classes}")
        shape = (-1,) + spec.input_shape
        return Dataset(self.name, self.x_train.reshape(shape), self.y_train, self.x_test.reshape(shape),
                       self.y_test, self.classes)


MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
IDX_FILES = {
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion_mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
}
CIFAR_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR_FOLDER = "cifar-10-batches-py"
NAMES = ("synthetic", "digits", "mnist", "fashion_mnist", "cifar10")


def data_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("NNCOMPARE_DATA") or Path.home() / ".cache" / "nncompare")


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, filename: str, checksum: str, folder: Path, mirror: str | None = None,
          timeout: float = 30) -> Path:
    """The verified file folder/filename, downloaded from the mirror if missing."""
    target = folder / filename
    if target.exists():
        if md5(target) != checksum:
            raise DataError(f"{target}: MD5 {md5(target)} does not match the published {checksum}; "
                            f"delete it to download again")
        return target
    url = (mirror or MIRRORS[name]) + filename
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        partial.unlink(missing_ok=True)
        raise DataError(f"dataset {name!r}: {filename} is not in {folder} and cannot be downloaded from {url} "
                        f"({getattr(e, 'reason', e)}); put the file there (or pass --data-dir)") from None
    if md5(partial) != checksum:
        partial.unlink()
        raise DataError(f"dataset {name!r}: {url} gave a file whose MD5 is not the published {checksum}")
    partial.replace(target)
    return target


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (gzip-compressed or not): magic 0x0000 <type 0x08 = uint8> <ndim>, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but the file holds {data.size} values")
    return data.reshape(dims)


def _idx_dataset(name: str, folder: Path, mirror: str | None) -> Dataset:
    sub = folder / name
    files = {f: fetch(name, f, c, sub, mirror) for f, c in IDX_FILES[name].items()}

    def images(f):
        return (read_idx(files[f]).astype(np.float32) / 255.0)[:, None]

    def labels(f):
        return read_idx(files[f]).astype(np.int64)

    return Dataset(name, images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
                   images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"), 10)


def _cifar10(folder: Path, mirror: str | None) -> Dataset:
    sub = folder / "cifar10"
    batches = sub / CIFAR_FOLDER
    if not (batches / "test_batch").exists():
        archive = fetch("cifar10", *CIFAR_ARCHIVE, sub, mirror)
        with tarfile.open(archive) as tar:
            tar.extractall(sub, filter="data")

    def load(names):
        xs, ys = [], []
        for n in names:
            path = batches / n
            if not path.exists():
                raise DataError(f"dataset 'cifar10': {path} is missing")
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], np.int64))
        return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)

    x_train, y_train = load([f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = load(["test_batch"])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def _digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped inside the package), 80/20 seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install 'nncompare[data]'") from None
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return Dataset("digits", x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], 10)


def synthetic(spec: ModelSpec, n_train: int = 1024, n_test: int = 256, seed: int = 0) -> Dataset:
    """Seeded Gaussian inputs of the spec's shape with random labels (for timing, not for learning)."""
    rng = np.random.default_rng(seed)
    classes = max(spec.num_classes, 2)

    def part(n):
        return rng.standard_normal((n,) + spec.input_shape).astype(np.float32), rng.integers(0, classes, n)

    return Dataset("synthetic", *part(n_train), *part(n_test), classes)


def load(name: str, spec: ModelSpec | None = None, folder: str | Path | None = None,
         mirror: str | None = None) -> Dataset:
    """A dataset by name, shaped for `spec` when given."""
    if name == "synthetic":
        if spec is None:
            raise DataError("dataset 'synthetic' needs a model to take its shape from")
        return synthetic(spec)
    if name == "digits":
        ds = _digits()
    elif name in IDX_FILES:
        ds = _idx_dataset(name, data_dir(folder), mirror)
    elif name == "cifar10":
        ds = _cifar10(data_dir(folder), mirror)
    else:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(NAMES)})")
    return ds.for_spec(spec) if spec is not None else ds
