"""Datasets as canonical NCHW float32 inputs and int64 labels: synthetic, digits, mnist, fashion_mnist, cifar10.

Files are read from a data folder (--data-dir, $NNCOMPARE_DATA, or ~/.cache/nncompare); missing files are
downloaded with MD5 verification when the network allows, else one message says where to put them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import stat
import tarfile
import zlib
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
    """The data folder: `path`, else $NNCOMPARE_DATA, else ~/.cache/nncompare; a DataError if it is a file."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise DataError(f"data folder must be a path, got {type(path).__name__} {path!r}"[:200])
    if isinstance(path, str) and not path.strip():
        raise DataError("data folder path is empty (pass None for the default folder)")
    folder = Path(path or os.environ.get("NNCOMPARE_DATA") or Path.home() / ".cache" / "nncompare")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data folder {folder} is not a folder (pass --data-dir a directory)")
    return folder


def _make_folder(folder: Path) -> Path | None:
    """Create `folder` (and missing parents); returns the topmost folder created, None if it existed."""
    top = None
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            top = top or p
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {folder}: {e.strerror or e}") from None
    return top


def _remove_if_empty(top: Path | None, folder: Path) -> None:
    """Undo _make_folder after a failed download: remove the folders it created, if they hold nothing."""
    if top is None:
        return
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()  # only ever removes an empty folder
        except OSError:
            return
        if p == top:
            return


MAX_FILE_BYTES = 128 << 20  # the largest file read here, a decompressed MNIST image set, is 47 MB
MAX_BATCH_BYTES = 64 << 20  # a CIFAR-10 batch is 31 MB
MAX_DOWNLOAD_BYTES = 256 << 20  # the CIFAR-10 archive, the largest download, is 163 MB


def open_regular(path: Path):
    """`path` opened for reading as a binary file, refused (OSError ENXIO-like, with a clear text) unless it is a
    regular file: a FIFO would block forever, a device like /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(0, "not a regular file")
    return os.fdopen(fd, "rb")


def read_bounded(f, limit: int, path: Path) -> bytes:
    """At most `limit` bytes of `f`, or a DataError naming the file: a bounded read, never a whole bomb."""
    raw = f.read(limit + 1)
    if len(raw) > limit:
        raise DataError(f"{path}: larger than {limit:,} bytes: not a file of this dataset")
    return raw


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, filename: str, checksum: str, folder: Path, mirror: str | None = None,
          timeout: float = 30) -> Path:
    """The verified file folder/filename, downloaded from the mirror if missing."""
    target = folder / filename
    if target.exists() or target.is_symlink():
        try:
            digest = md5(target)
        except OSError as e:
            raise DataError(f"{target}: cannot read it ({e.strerror or e})") from None
        if digest != checksum:
            raise DataError(f"{target}: MD5 {digest} does not match the published {checksum}; "
                            f"delete it to download again")
        return target
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is not a folder: cannot keep dataset {name!r} there")
    url = (mirror or MIRRORS[name]) + filename
    created = _make_folder(folder)
    partial = target.with_name(target.name + ".part")
    try:
        if partial.is_symlink() or partial.exists() and not partial.is_dir():
            partial.unlink()  # an earlier attempt's leftover; a link there must not redirect the download
        out = os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666),
                        "wb")
    except OSError as e:
        _remove_if_empty(created, folder)
        raise DataError(f"dataset {name!r}: cannot write {partial} ({e.strerror or e})") from None
    try:
        with out, urllib.request.urlopen(url, timeout=timeout) as response:
            size = 0
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:  # a mirror that never stops must not fill the disk
                    raise ValueError(f"it sends more than {MAX_DOWNLOAD_BYTES:,} bytes")
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:  # ValueError: a malformed URL
        partial.unlink(missing_ok=True)
        _remove_if_empty(created, folder)
        raise DataError(f"dataset {name!r}: {filename} is not in {folder} and cannot be downloaded from {url} "
                        f"({getattr(e, 'reason', e)}); put the file there (or pass --data-dir)") from None
    if md5(partial) != checksum:
        partial.unlink()
        _remove_if_empty(created, folder)
        raise DataError(f"dataset {name!r}: {url} gave a file whose MD5 is not the published {checksum}")
    partial.replace(target)
    return target


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (gzip-compressed or not): magic 0x0000 <type 0x08 = uint8> <ndim>, big-endian dims."""
    zipped = path.suffix == ".gz"
    try:
        with open_regular(path) as plain, (gzip.GzipFile(fileobj=plain, mode="rb") if zipped else plain) as f:
            raw = read_bounded(f, MAX_FILE_BYTES, path)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a truncated gzip an EOFError
        raise DataError(f"{path}: cannot read it as {'gzip' if zipped else 'a file'} "
                        f"({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header for {ndim} dimensions is truncated or empty")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but the file holds {data.size} values")
    return data.reshape(dims)


def _idx_dataset(name: str, folder: Path, mirror: str | None) -> Dataset:
    sub = folder / name
    files = {f: fetch(name, f, c, sub, mirror) for f, c in IDX_FILES[name].items()}

    def images(f):
        a = read_idx(files[f])
        if a.ndim != 3:
            raise DataError(f"{files[f]}: images must be (N, H, W), the file holds shape {a.shape}")
        return (a.astype(np.float32) / 255.0)[:, None]

    def labels(f):
        a = read_idx(files[f])
        if a.ndim != 1:
            raise DataError(f"{files[f]}: labels must be (N,), the file holds shape {a.shape}")
        return a.astype(np.int64)

    parts = []
    for split in ("train", "t10k"):
        x, y = images(f"{split}-images-idx3-ubyte.gz"), labels(f"{split}-labels-idx1-ubyte.gz")
        _check_pair(files[f"{split}-labels-idx1-ubyte.gz"], x, y, 10)
        parts += [x, y]
    return Dataset(name, *parts, 10)


def _check_pair(where: Path, x: np.ndarray, y: np.ndarray, classes: int) -> None:
    """One label per image, each a class 0..classes-1."""
    if len(x) != len(y):
        raise DataError(f"{where}: {len(y)} labels for {len(x)} images")
    bad = (y < 0) | (y >= classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{where}: label {int(y[i])} at index {i} is not a class 0..{classes - 1}")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (a dict of bytes, lists and uint8 arrays): any other class
    or function named in the file is refused, so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                                     f"bytes, lists and uint8 arrays")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as (uint8 (N, 3, 32, 32), int64 (N,)), read without executing anything."""
    try:
        with open_regular(path) as f:
            raw = read_bounded(f, MAX_BATCH_BYTES, path)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed stream: UnpicklingError, EOFError, ValueError, TypeError, ...
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(map(repr, d))[:4] if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels', got {keys})")
    data, labels = d[b"data"], d[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {desc}")
    # checked element by element before NumPy sees it: np.asarray of nested lists sharing one list (a few bytes
    # of pickle) would build an array of every path through them, gigabytes
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        y = labels
    elif isinstance(labels, list) and all(type(v) is int or isinstance(v, np.integer) for v in labels):
        try:
            y = np.array(labels, dtype=np.int64)
        except OverflowError:
            raise DataError(f"{path}: b'labels' holds an integer too large to be a class") from None
    else:
        raise DataError(f"{path}: b'labels' must be a list of integers")
    x = data.reshape(-1, 3, 32, 32)
    y = y.astype(np.int64)
    _check_pair(path, x, y, 10)
    return x, y


def _cifar10(folder: Path, mirror: str | None) -> Dataset:
    sub = folder / "cifar10"
    batches = sub / CIFAR_FOLDER
    if not (batches / "test_batch").exists():
        archive = fetch("cifar10", *CIFAR_ARCHIVE, sub, mirror)  # MD5-verified: its members are the published ones
        try:
            with open_regular(archive) as f, tarfile.open(fileobj=f) as tar:
                tar.extractall(sub, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{archive}: cannot extract it ({e}); delete it to download again") from None

    def load(names):
        xs, ys = [], []
        for n in names:
            path = batches / n
            if not path.is_file():  # a FIFO or device is refused by read_cifar_batch
                raise DataError(f"dataset 'cifar10': {path} is missing" + " or not a regular file" * path.exists())
            x, y = read_cifar_batch(path)
            xs.append(x)
            ys.append(y)
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
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string ({', '.join(NAMES)}), got {type(name).__name__}")
    if spec is not None and not isinstance(spec, ModelSpec):
        raise DataError(f"dataset {name!r}: spec must be a ModelSpec, got {type(spec).__name__}")
    if mirror is not None and not isinstance(mirror, str):
        raise DataError(f"dataset {name!r}: mirror must be a URL string, got {type(mirror).__name__}")
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
