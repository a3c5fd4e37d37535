"""Dataset loading from files the tests write in the real formats; download, checksum and missing-file paths."""
import gzip
import hashlib
import http.server
import pickle
import threading
from functools import partial

import numpy as np
import pytest

from nncompare.models import data, zoo
from nncompare.models.data import DataError, load


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A 12/5-sample MNIST in IDX gz files, with the checksum table pointing at them."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "files"
    folder.mkdir()
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5)}
    for name, a in arrays.items():
        write_idx(folder / name, a)
    monkeypatch.setitem(data.IDX_FILES, "mnist", {n: md5(folder / n) for n in arrays})
    return folder, arrays


def test_idx_files_load_as_nchw_float32_and_int64(tiny_mnist, tmp_path):
    folder, arrays = tiny_mnist
    (tmp_path / "d" / "mnist").mkdir(parents=True)
    for f in folder.iterdir():
        (tmp_path / "d" / "mnist" / f.name).write_bytes(f.read_bytes())
    ds = load("mnist", zoo.get("lenet5"), tmp_path / "d")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and list(ds.y_test) == list(arrays["t10k-labels-idx1-ubyte.gz"])
    np.testing.assert_allclose(ds.x_test[:, 0], arrays["t10k-images-idx3-ubyte.gz"] / 255.0, rtol=1e-6)
    flat = load("mnist", zoo.get("mlp"), tmp_path / "d")
    assert flat.x_train.shape == (12, 784)


def test_a_corrupt_idx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataError, match="header says"):
        data.read_idx(bad)


@pytest.fixture
def loopback_server(tiny_mnist):
    folder, _ = tiny_mnist
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()


def test_missing_files_are_downloaded_and_verified(loopback_server, tmp_path):
    url, _ = loopback_server
    ds = load("mnist", zoo.get("lenet5"), tmp_path / "cache", mirror=url)
    assert len(ds.x_train) == 12 and len(ds.x_test) == 5
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(data.IDX_FILES["mnist"])


def test_a_download_with_the_wrong_checksum_is_rejected(loopback_server, tmp_path, monkeypatch):
    url, _ = loopback_server
    monkeypatch.setitem(data.IDX_FILES["mnist"], "train-images-idx3-ubyte.gz", "0" * 32)
    with pytest.raises(DataError, match="MD5 is not the published"):
        load("mnist", zoo.get("lenet5"), tmp_path / "cache", mirror=url)
    assert not list((tmp_path / "cache" / "mnist").glob("train-images*"))


def test_missing_files_without_network_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as e:
        load("fashion_mnist", zoo.get("lenet5"), tmp_path, mirror="http://127.0.0.1:9/")
    message = str(e.value)
    assert "train-images-idx3-ubyte.gz is not in" in message and str(tmp_path / "fashion_mnist") in message
    assert "put the file there" in message


def test_cifar10_pickle_batches_load(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
                         b"labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    ds = load("cifar10", zoo.get("cifar_cnn"), tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    # channels-first: the first 1024 bytes of a row are the red plane
    np.testing.assert_allclose(ds.x_test[0, 0].ravel(), batches["test_batch"][b"data"][0, :1024] / 255.0, rtol=1e-6)
    assert list(ds.y_test) == batches["test_batch"][b"labels"]


def test_digits_ship_with_scikit_learn_and_fit_the_digits_models():
    cnn = load("digits", zoo.get("digits_cnn"))
    assert cnn.x_train.shape == (1437, 1, 8, 8) and cnn.x_test.shape == (360, 1, 8, 8)
    assert 0 <= cnn.x_train.min() and cnn.x_train.max() <= 1 and set(cnn.y_train) == set(range(10))
    mlp = load("digits", zoo.get("digits_mlp"))
    assert mlp.x_train.shape == (1437, 64)
    np.testing.assert_array_equal(mlp.x_train.reshape(-1, 1, 8, 8), cnn.x_train)


def test_a_dataset_that_does_not_fit_the_model_is_a_clear_error():
    with pytest.raises(DataError, match="expects"):
        load("digits", zoo.get("lenet5"))
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load("imagenet", zoo.get("lenet5"))


def test_synthetic_data_takes_the_spec_shape():
    ds = load("synthetic", zoo.get("cifar_cnn"))
    assert ds.x_train.shape[1:] == (3, 32, 32) and ds.x_train.dtype == np.float32


# --- corrupt, truncated and hostile files --------------------------------------------------------------
def test_garbage_and_truncated_idx_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match=f"{garbage}: cannot read it as gzip"):
        data.read_idx(garbage)
    whole = tmp_path / "whole.gz"
    write_idx(whole, np.arange(600).reshape(6, 10, 10) % 256)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(whole.read_bytes()[:40])
    with pytest.raises(DataError, match=f"{truncated}: cannot read it as gzip"):
        data.read_idx(truncated)
    for name, payload, message in (("magic.gz", b"\x1f\x8b" + bytes(10), "cannot read it as gzip"),
                                   ("float.idx", bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]),
                                    "not an unsigned-byte IDX file"),
                                   ("header.idx", bytes([0, 0, 0x08, 3, 0, 0, 0, 5]),
                                    "IDX header for 3 dimensions is truncated"),
                                   ("scalar.idx", bytes([0, 0, 0x08, 0, 7]), "IDX header for 0 dimensions")):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(DataError, match=f"{tmp_path / name}: {message}"):
            data.read_idx(tmp_path / name)
    with pytest.raises(DataError, match=f"{tmp_path}: cannot read it"):
        data.read_idx(tmp_path)  # a folder where a file belongs


def _mnist_folder(tmp_path, monkeypatch, arrays):
    """An mnist folder holding `arrays` (file name -> array) with the checksum table pointing at them."""
    folder = tmp_path / "d" / "mnist"
    folder.mkdir(parents=True)
    for name, a in arrays.items():
        write_idx(folder / name, a)
    monkeypatch.setitem(data.IDX_FILES, "mnist", {n: md5(folder / n) for n in arrays})
    return folder


def test_idx_images_and_labels_must_agree(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.array([1, 2, 3]),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (2, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": np.array([0, 1])}
    folder = _mnist_folder(tmp_path, monkeypatch, arrays)
    with pytest.raises(DataError, match=f"{folder / 'train-labels-idx1-ubyte.gz'}: 3 labels for 4 images"):
        load("mnist", folder=tmp_path / "d")


def test_idx_labels_out_of_range_or_misshaped(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.array([1, 12, 3]),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (2, 28 * 28)),
              "t10k-labels-idx1-ubyte.gz": np.array([0, 1])}
    folder = _mnist_folder(tmp_path, monkeypatch, arrays)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: label 12 at index 1 is not a class 0..9"):
        load("mnist", folder=tmp_path / "d")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    monkeypatch.setitem(data.IDX_FILES["mnist"], "train-labels-idx1-ubyte.gz",
                        md5(folder / "train-labels-idx1-ubyte.gz"))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: images must be \(N, H, W\), the file holds "
                                        r"shape \(2, 784\)"):
        load("mnist", folder=tmp_path / "d")


def _cifar(tmp_path, test_batch):
    """A cifar10 folder with five good training batches and `test_batch` (bytes) as the test batch."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), b"labels": [1, 2]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(test_batch)
    return folder / "test_batch"


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates a file if the loader executes it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_cifar_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Payload(marker), b"labels": [0]})
    pickle.loads(evil)[b"data"].close()  # the payload is live: plain pickle creates the file
    assert marker.exists()
    marker.unlink()
    path = _cifar(tmp_path, evil)
    with pytest.raises(DataError, match=f"{path}: not a CIFAR-10 batch .*refusing to load _?io.open"):  # _io.open on Python 3.12
        load("cifar10", folder=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("payload, message", [
    (b"\x80\x04garbage", "not a CIFAR-10 batch (UnpicklingError"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})[:-30], "not a CIFAR-10 batch"),
    (pickle.dumps([1, 2, 3]), "not a CIFAR-10 batch (expected a dict with b'data' and b'labels', got list)"),
    (pickle.dumps({"data": 1, "labels": 2}), "expected a dict with b'data' and b'labels', got ["),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}),
     "b'data' must be a uint8 array of shape (N, 3072), got uint8 array of shape (2, 100)"),
    (pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [1, 2]}), "b'data' must be a uint8 array"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}),
     "b'labels' must be a list of integers"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "1 labels for 2 images"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}),
     "label 10 at index 1 is not a class 0..9"),
], ids=["garbage", "truncated", "a-list", "str-keys", "short-rows", "float-data", "bytes-labels", "too-few-labels",
        "label-10"])
def test_a_cifar_batch_that_is_not_one_is_a_clear_error(tmp_path, payload, message):
    path = _cifar(tmp_path, payload)
    with pytest.raises(DataError) as e:
        load("cifar10", folder=tmp_path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_data_dir_that_is_a_file_or_cannot_be_made(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DataError, match=f"data folder {afile} is not a folder"):
        load("mnist", folder=afile)
    with pytest.raises(DataError, match=f"cannot create the data folder {afile / 'sub' / 'mnist'}"):
        load("mnist", folder=afile / "sub", mirror="http://127.0.0.1:9/")
    with pytest.raises(DataError, match="dataset name must be a string"):
        load(["mnist"])


def test_a_failed_download_leaves_no_empty_folders(tmp_path):
    with pytest.raises(DataError, match="cannot be downloaded"):
        load("mnist", folder=tmp_path / "new" / "cache", mirror="http://127.0.0.1:9/")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError, match="cannot be downloaded"):
        load("mnist", folder=tmp_path / "kept", mirror="http://127.0.0.1:9/")
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_a_folder_in_place_of_a_data_file(tmp_path):
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").mkdir(parents=True)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read it"):
        load("mnist", folder=tmp_path)


def test_load_checks_its_arguments():
    for kw, message in (({"folder": 123}, "data folder must be a path, got int 123"),
                        ({"spec": "lenet5"}, "spec must be a ModelSpec, got str"),
                        ({"mirror": 5}, "mirror must be a URL string, got int")):
        with pytest.raises(DataError, match=message):
            load("mnist", **kw)


@pytest.fixture
def unblocking():
    """Opens each FIFO for writing after a few seconds, then closes it: code that (wrongly) opens a FIFO for
    reading gets an empty file instead of blocking the test run forever."""
    import os
    import time
    fifos = []

    def release():
        time.sleep(3)
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # nobody is reading it: the code under test refused it
    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield fifos.append
    thread.join()


def test_fifos_in_place_of_data_files_are_refused_without_blocking(tmp_path, unblocking):
    import os
    (tmp_path / "mnist").mkdir()
    os.mkfifo(tmp_path / "mnist" / "train-images-idx3-ubyte.gz")
    batches = tmp_path / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        os.mkfifo(batches / name)
    for f in (tmp_path / "mnist" / "train-images-idx3-ubyte.gz", batches / "data_batch_1"):
        unblocking(f)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read it .*not a regular file"):
        load("mnist", folder=tmp_path)
    with pytest.raises(DataError, match="data_batch_1 is missing or not a regular file"):
        load("cifar10", folder=tmp_path)
    for reader in (data.read_idx, data.read_cifar_batch):
        with pytest.raises(DataError, match="not a regular file"):
            reader(batches / "data_batch_1")


def test_a_device_in_place_of_a_data_file_is_refused():
    from pathlib import Path
    for reader in (data.read_idx, data.read_cifar_batch):
        with pytest.raises(DataError, match="/dev/zero: cannot read it.*not a regular file"):
            reader(Path("/dev/zero"))


def test_a_nested_list_bomb_in_cifar_labels_is_refused_before_it_grows(tmp_path):
    """Lists sharing one list pickle in a few hundred bytes; NumPy would expand them to 2**30 int64 (8 GiB). Run
    under a 1 GiB address-space limit, so that code which builds the array fails instead of eating the machine."""
    import subprocess
    import sys
    labels = [0, 0]
    for _ in range(29):
        labels = [labels, labels]
    path = _cifar(tmp_path, pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}))
    assert path.stat().st_size < 10_000
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from nncompare.models.data import load, DataError\n"
            f"try:\n    load('cifar10', folder={str(tmp_path)!r})\n"
            "except DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert f"{path}: b'labels' must be a list of integers" in out.stdout


def test_oversized_data_files_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_BATCH_BYTES", 1000)
    _cifar(tmp_path, pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(DataError, match="data_batch_1: larger than 1,000 bytes: not a file of this dataset"):
        load("cifar10", folder=tmp_path)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)  # a gzip bomb: small file, large content
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 1, 0]) + bytes(256))
    with pytest.raises(DataError, match="bomb.gz: larger than"):
        data.read_idx(bomb)


def test_an_empty_data_folder_path_is_refused():
    with pytest.raises(DataError, match="data folder path is empty"):
        load("mnist", folder="")


def test_a_link_left_in_place_of_a_partial_download_is_not_followed(loopback_server, tmp_path):
    import os
    url, _ = loopback_server
    folder = tmp_path / "cache" / "mnist"
    folder.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, folder / "train-images-idx3-ubyte.gz.part")
    os.mkfifo(folder / "train-labels-idx1-ubyte.gz.part")  # opening it for writing would block forever
    ds = load("mnist", zoo.get("lenet5"), tmp_path / "cache", mirror=url)
    assert len(ds.x_train) == 12 and victim.read_text() == "precious"
    assert not list(folder.glob("*.part"))


def test_a_download_that_never_ends_is_cut_off(loopback_server, tmp_path, monkeypatch):
    url, _ = loopback_server
    monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", 100)
    with pytest.raises(DataError, match="it sends more than 100 bytes"):
        load("mnist", zoo.get("lenet5"), tmp_path / "cache", mirror=url)
    assert not (tmp_path / "cache").exists()
