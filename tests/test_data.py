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
