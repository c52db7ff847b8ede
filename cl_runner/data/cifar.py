"""CIFAR-10 and CIFAR-100 from the official python-pickle batches.

Layouts searched under ``data_dir`` (the first that has every file wins):

* ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (the official archive,
  unpacked; also what torchvision's downloader writes under its root),
* ``<data_dir>/cifar10/cifar-10-batches-py/...``,

and for CIFAR-100 ``cifar-100-python/{train, test}`` in the same places (``cifar100/``). Each
file is a pickled dict with ``b'data'`` (N x 3072 uint8, the 1024 red, then green, then blue
values of a 32 x 32 image in row-major order) and ``b'labels'`` (CIFAR-10) or
``b'fine_labels'`` (CIFAR-100, the 100 classes used here). The per-channel mean and standard
deviation are computed from the training images (on the [0, 1] scale).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from cl_runner.errors import DataError

FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
TRAIN_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
TORCHVISION_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def find_files(data_dir: Path, name: str) -> dict[str, Path] | None:
    """The dataset's pickle files keyed by file name, or None when some are missing."""
    data_dir = Path(data_dir)
    stems = TRAIN_FILES[name] + TEST_FILES[name]
    for folder in (data_dir / FOLDER[name], data_dir / name / FOLDER[name]):
        found = {s: folder / s for s in stems}
        if all(p.is_file() for p in found.values()):
            return found
    return None


def missing_message(data_dir: Path, name: str, why: str) -> str:
    files = ", ".join(TRAIN_FILES[name] + TEST_FILES[name])
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    return (f"{name} was not found under data_dir={data_dir} ({why}). Unpack the official "
            f"{archive} so that {data_dir / FOLDER[name]}/ holds {files}, or point data_dir at a "
            f"folder that has them (data_dir=/path or env CLRUN_DATA_DIR), or on a connected "
            f"machine run 'pip install torchvision' and let clrun download them.")


def _download(data_dir: Path, name: str) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception:  # noqa: BLE001 - any import failure means "cannot download"
        raise DataError(missing_message(data_dir, name, "torchvision is not installed")) from None
    try:
        getattr(tvd, TORCHVISION_CLASS[name])(root=str(data_dir), train=True, download=True)
    except Exception as ex:  # noqa: BLE001 - network errors come in many types
        raise DataError(missing_message(data_dir, name, f"the download failed: {ex}")) from None


def read_batch(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle file as images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as ex:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(ex).__name__}: {ex}); the file "
                        f"is truncated or corrupt: download and unpack the {name} archive again.") from None
    key = LABEL_KEY[name]
    if not isinstance(d, dict) or b"data" not in d or key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path} does not hold a CIFAR batch: expected the keys b'data' and {key!r}, "
                        f"found {keys}. Is it a file of the other CIFAR dataset?")
    x = np.asarray(d[b"data"])
    y = np.asarray(d[key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path}: b'data' is {x.dtype} {x.shape} with {len(y)} labels; expected uint8 "
                        f"(N, 3072) with N labels (the file is corrupt).")
    k = NUM_CLASSES[name]
    if y.size and (int(y.min()) < 0 or int(y.max()) >= k):
        raise DataError(f"{path}: labels span {int(y.min())}..{int(y.max())}; expected 0..{k - 1} "
                        f"(the file is corrupt).")
    return x.reshape(-1, 3, 32, 32), y


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W) on the [0, 1] scale."""
    c = x.shape[1]
    flat = np.moveaxis(x, 1, 0).reshape(c, -1)
    s1 = flat.sum(axis=1, dtype=np.float64)
    s2 = np.einsum("ij,ij->i", flat.astype(np.float64), flat.astype(np.float64))
    n = flat.shape[1]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return tuple(float(m / 255.0) for m in mean), tuple(float(s / 255.0) for s in std)


def load(name: str, root: Path, download: bool = True):
    """CIFAR-10 or CIFAR-100 as an :class:`ImageDataset`."""
    from cl_runner.data.datasets import ImageDataset

    files = find_files(root, name)
    if files is None:
        if not download:
            raise DataError(missing_message(root, name, "downloads are off"))
        _download(root, name)
        files = find_files(root, name)
        if files is None:
            raise DataError(missing_message(root, name, "the downloaded files were not found"))
    parts = {}
    for split, stems in (("train", TRAIN_FILES[name]), ("test", TEST_FILES[name])):
        batches = [read_batch(files[s], name) for s in stems]
        parts[split] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    mean, std = channel_stats(parts["train"][0])
    return ImageDataset(name=name, train_x=parts["train"][0], train_y=parts["train"][1],
                        test_x=parts["test"][0], test_y=parts["test"][1],
                        num_classes=NUM_CLASSES[name], mean=mean, std=std)
