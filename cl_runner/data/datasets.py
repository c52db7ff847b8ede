"""Locating, verifying and (when connected) downloading the raw image datasets.

Layouts searched under ``data_dir`` for a dataset ``mnist``:

* ``<data_dir>/mnist/<file>[.gz]`` (the layout of a shared offline copy),
* ``<data_dir>/MNIST/raw/<file>[.gz]`` (what torchvision's downloader writes),
* ``<data_dir>/<file>[.gz]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cl_runner.data.idx import load_idx
from cl_runner.errors import DataError

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the *uncompressed* IDX files as published.
KNOWN_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

# Uncompressed sizes of the published files; checksums are verified for files of these sizes
# (small files in the same format, as tests write them, are only checked for a valid IDX layout).
OFFICIAL_SIZES = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}

# Per-dataset pixel statistics of the training split (on the [0, 1] scale).
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


@dataclass
class ImageDataset:
    """A whole labelled image dataset as uint8 arrays of shape (N, C, H, W) and int64 labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def default_data_dir() -> Path:
    env = os.environ.get("CLRUN_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return default_cache_dir() / "data"


def default_cache_dir() -> Path:
    env = os.environ.get("CLRUN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clrun"


def _candidates(data_dir: Path, name: str, stem: str) -> list[Path]:
    folders = [data_dir / name, data_dir / TORCHVISION_FOLDER[name] / "raw", data_dir]
    return [folder / (stem + ext) for folder in folders for ext in ("", ".gz")]


# Colour datasets read by their own modules (cl_runner/data/cifar.py, tinyimagenet.py).
OTHER_DATASETS = {"cifar10": "cl_runner.data.cifar", "cifar100": "cl_runner.data.cifar",
                  "tinyimagenet": "cl_runner.data.tinyimagenet"}


def _other(name: str):
    import importlib

    return importlib.import_module(OTHER_DATASETS[name])


def find_files(data_dir: Path, name: str) -> dict[str, Path] | None:
    if name in OTHER_DATASETS:
        return _other(name).find_files(Path(data_dir), name)
    found = {}
    for key, stem in FILES.items():
        hit = next((p for p in _candidates(data_dir, name, stem) if p.is_file()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def _download(data_dir: Path, name: str) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception:  # noqa: BLE001 - any import failure means "cannot download"
        raise DataError(_missing_message(data_dir, name, "torchvision is not installed")) from None
    cls = getattr(tvd, TORCHVISION_CLASS[name])
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as ex:  # noqa: BLE001 - network errors come in many types
        raise DataError(_missing_message(data_dir, name, f"the download failed: {ex}")) from None


def _missing_message(data_dir: Path, name: str, why: str) -> str:
    files = ", ".join(f + ".gz" for f in FILES.values())
    return (
        f"{name} was not found under data_dir={data_dir} and could not be downloaded ({why}). "
        f"Put the four IDX files ({files}) in {data_dir / name}/, or point data_dir at a folder "
        f"that has them (data_dir=/path or env CLRUN_DATA_DIR), or on a connected machine run "
        f"'pip install torchvision' and let clrun download them."
    )


def load_image_dataset(name: str, data_dir: str | os.PathLike | None, download: bool = True) -> ImageDataset:
    """Load ``mnist`` or ``fashion-mnist`` from ``data_dir``, downloading when allowed and missing."""
    if name in OTHER_DATASETS:
        return _other(name).load(name, Path(data_dir).expanduser() if data_dir else default_data_dir(),
                                 download=download)
    if name not in FILES and name not in KNOWN_SHA256:
        raise DataError(f"unknown dataset '{name}'")
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    files = find_files(root, name)
    if files is None:
        if not download:
            raise DataError(_missing_message(root, name, "downloads are off"))
        _download(root, name)
        files = find_files(root, name)
        if files is None:
            raise DataError(_missing_message(root, name, "the downloaded files were not found"))
    sums = KNOWN_SHA256.get(name, {})
    arrays = {k: load_idx(p, sums.get(FILES[k]), OFFICIAL_SIZES[FILES[k]]) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{name} {split} files disagree: images {x.shape}, labels {y.shape} "
                            f"({files[split + '_x']}).")
        if y.size and int(y.max()) >= 10:
            raise DataError(f"{name} {split} labels go up to {int(y.max())}; expected 0..9 "
                            f"({files[split + '_y']} is corrupt).")
    mean, std = STATS[name]
    return ImageDataset(
        name=name,
        train_x=arrays["train_x"][:, None],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"][:, None],
        test_y=arrays["test_y"].astype(np.int64),
        num_classes=10,
        mean=(mean,),
        std=(std,),
    )
