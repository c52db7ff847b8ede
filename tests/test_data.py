"""IDX reading and writing, dataset discovery, and the errors for missing or corrupt files."""

from __future__ import annotations

import gzip
import hashlib
import shutil

import numpy as np
import pytest

from cl_runner.data import datasets
from cl_runner.data.datasets import FILES, KNOWN_SHA256, OFFICIAL_SIZES, find_files, load_image_dataset
from cl_runner.data.idx import load_idx, parse_idx, read_bytes, write_idx
from cl_runner.errors import DataError

from conftest import write_tiny_dataset


# -- the IDX format -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 2, 4, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, arr)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")  # gzip magic only for .gz
    back = load_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_idx_header_layout(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), then each dimension as a big-endian uint32.
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    raw = path.read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[16:] == bytes(range(24))


def test_parse_big_endian_types():
    values = np.array([1, -2, 70000], dtype=">i4")
    data = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes()
    arr = parse_idx(data)
    assert arr.tolist() == [1, -2, 70000]
    assert arr.dtype.isnative
    f = np.array([0.5, -1.25], dtype=">f8")
    arr = parse_idx(bytes([0, 0, 0x0E, 1]) + (2).to_bytes(4, "big") + f.tobytes())
    assert arr.tolist() == [0.5, -1.25]


def test_corrupt_gzip_names_the_path(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError) as ei:
        load_idx(path)
    assert str(path) in str(ei.value) and "gzip" in str(ei.value)


def test_truncated_gzip_names_the_path(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((50, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="corrupt") as ei:
        read_bytes(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_payload_names_the_path_and_sizes(tmp_path, suffix):
    payload = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in (4, 28, 28))
    payload += bytes(4 * 28 * 28 - 100)  # 100 bytes short
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(payload) if suffix else payload)
    with pytest.raises(DataError) as ei:
        load_idx(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "(4, 28, 28)" in msg and f"{16 + 4 * 784} bytes" in msg and f"{len(payload)} bytes" in msg


def test_extra_bytes_are_corrupt_too(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.arange(10, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="header promises"):
        load_idx(path)


@pytest.mark.parametrize("data, words", [
    (b"\x1f\x8b\x08\x00garbage", "does not start with an IDX header"),  # a gzip file without .gz
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "does not start with an IDX header"),  # unknown type
    (bytes([1, 0, 0x08, 1, 0, 0, 0, 1, 5]), "does not start with an IDX header"),  # bad magic
    (b"\x00\x00", "does not start with an IDX header"),
    (bytes([0, 0, 0x08, 3, 0, 0, 0, 1]), "truncated IDX header"),
])
def test_bad_header(tmp_path, data, words):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError) as ei:
        load_idx(path)
    assert words in str(ei.value) and str(path) in str(ei.value)


def test_unreadable_path(tmp_path):
    with pytest.raises(DataError, match="cannot read data file") as ei:
        load_idx(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(ei.value)


def test_sha256_checked_only_for_the_given_size(tmp_path):
    path = tmp_path / "labels"
    arr = np.arange(10, dtype=np.uint8)
    write_idx(path, arr)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(load_idx(path, good, size=18), arr)
    with pytest.raises(DataError, match="SHA-256"):
        load_idx(path, "0" * 64, size=18)
    with pytest.raises(DataError, match="SHA-256"):
        load_idx(path, "0" * 64)  # no size: always checked
    # A file of another size (a small test file in the same format) is not checked.
    np.testing.assert_array_equal(load_idx(path, "0" * 64, size=10008), arr)


# -- finding and loading datasets ---------------------------------------------------------------

def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as ei:
        load_image_dataset("mnist", tmp_path, download=False)
    msg = str(ei.value)
    assert f"data_dir={tmp_path}" in msg
    assert str(tmp_path / "mnist") in msg  # where to put the files
    for stem in FILES.values():
        assert stem + ".gz" in msg
    assert "CLRUN_DATA_DIR" in msg
    assert "torchvision" in msg and "download" in msg


def test_missing_data_when_download_fails(tmp_path, monkeypatch):
    # No network: the download error is reported along with where to put the files.
    def fail(data_dir, name):
        raise DataError(datasets._missing_message(data_dir, name, "the download failed: offline"))

    monkeypatch.setattr(datasets, "_download", fail)
    with pytest.raises(DataError, match="the download failed: offline") as ei:
        load_image_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(ei.value)


def test_partial_dataset_is_missing(tmp_path):
    folder = write_tiny_dataset(tmp_path, "mnist", n_train=20, n_test=10)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_files(tmp_path, "mnist") is None
    with pytest.raises(DataError, match="was not found"):
        load_image_dataset("mnist", tmp_path, download=False)


@pytest.mark.parametrize("layout", ["named", "torchvision", "flat"])
@pytest.mark.parametrize("compress", [True, False])
def test_layouts(tmp_path, layout, compress):
    sub = {"named": "mnist", "torchvision": "MNIST/raw", "flat": "."}[layout]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    y = np.arange(12, dtype=np.uint8) % 10
    ext = ".gz" if compress else ""
    for key, arr in (("train_x", x), ("train_y", y), ("test_x", x[:4]), ("test_y", y[:4])):
        write_idx(tmp_path / sub / (FILES[key] + ext), arr)
    ds = load_image_dataset("mnist", tmp_path, download=False)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == np.uint8
    assert ds.train_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[:, 0], x)
    np.testing.assert_array_equal(ds.test_y, y[:4])
    assert ds.num_classes == 10 and ds.mean == (0.1307,) and ds.std == (0.3081,)


def test_dataset_consistency_checks(tmp_path):
    folder = write_tiny_dataset(tmp_path, "mnist", n_train=20, n_test=10)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="test files disagree"):
        load_image_dataset("mnist", tmp_path, download=False)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(DataError, match="labels go up to 12") as ei:
        load_image_dataset("mnist", tmp_path, download=False)
    assert "t10k-labels-idx1-ubyte.gz" in str(ei.value)


def test_corrupt_file_in_dataset_names_it(tmp_path):
    folder = write_tiny_dataset(tmp_path, "mnist", n_train=20, n_test=10)
    bad = folder / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError) as ei:
        load_image_dataset("mnist", tmp_path, download=False)
    assert str(bad) in str(ei.value)


# -- checksums of the published files -----------------------------------------------------------

def test_official_sizes_match_the_shapes():
    assert OFFICIAL_SIZES["train-images-idx3-ubyte"] == 16 + 60000 * 28 * 28
    assert OFFICIAL_SIZES["t10k-images-idx3-ubyte"] == 16 + 10000 * 28 * 28
    assert OFFICIAL_SIZES["train-labels-idx1-ubyte"] == 8 + 60000
    assert OFFICIAL_SIZES["t10k-labels-idx1-ubyte"] == 8 + 10000


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_shared_labels_match_published_sha256(shared_data_dir, name):
    for stem in ("t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        data = gzip.decompress((shared_data_dir / name / f"{stem}.gz").read_bytes())
        assert len(data) == OFFICIAL_SIZES[stem]
        assert hashlib.sha256(data).hexdigest() == KNOWN_SHA256[name][stem]


def test_shared_mnist_loads_with_checksums(shared_data_dir):
    ds = load_image_dataset("mnist", shared_data_dir, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize("compress", [False, True])
def test_flipped_byte_in_full_size_file_fails(tmp_path, shared_data_dir, compress):
    """A full-size copy of the real test labels with one label changed (still a valid label)."""
    stem = "t10k-labels-idx1-ubyte"
    data = bytearray(gzip.decompress((shared_data_dir / "mnist" / f"{stem}.gz").read_bytes()))
    folder = write_tiny_dataset(tmp_path, "mnist", n_train=20, n_test=10)
    target = folder / f"{stem}.gz"
    # The untouched copy passes the checksum.
    good = tmp_path / "good" / stem
    good.parent.mkdir()
    good.write_bytes(bytes(data))
    assert load_idx(good, KNOWN_SHA256["mnist"][stem], OFFICIAL_SIZES[stem]).shape == (10000,)
    data[5000] = (data[5000] + 1) % 10
    target.unlink()
    if compress:
        target.write_bytes(gzip.compress(bytes(data)))
    else:
        target = folder / stem
        target.write_bytes(bytes(data))
    with pytest.raises(DataError) as ei:
        load_image_dataset("mnist", tmp_path, download=False)
    msg = str(ei.value)
    assert "SHA-256" in msg and str(target) in msg and "Delete it" in msg


def test_full_size_copy_of_shared_test_split_loads(tmp_path, shared_data_dir):
    # The 10k test files at their official sizes are checked and accepted.
    folder = write_tiny_dataset(tmp_path, "mnist", n_train=20, n_test=10)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(shared_data_dir / "mnist" / f"{stem}.gz", folder / f"{stem}.gz")
    ds = load_image_dataset("mnist", tmp_path, download=False)
    assert ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first digits
