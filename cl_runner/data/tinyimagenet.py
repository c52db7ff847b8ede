"""Tiny ImageNet (200 classes of 64 x 64 colour images) from the official zip's folder layout.

Expected under ``data_dir`` (the unpacked ``tiny-imagenet-200.zip``)::

    tiny-imagenet-200/wnids.txt                     one WordNet id per line, 200 lines
    tiny-imagenet-200/train/<wnid>/images/*.JPEG    500 training images per class
    tiny-imagenet-200/val/images/*.JPEG             10,000 validation images
    tiny-imagenet-200/val/val_annotations.txt       <file> TAB <wnid> TAB <box...> per line

(or the same under ``<data_dir>/tinyimagenet/``). The official test split has no labels, so the
validation split is the test set, as in every continual-learning paper that uses it. Class c is
the c-th WordNet id in sorted order (the order of torchvision's ImageFolder). Grey-scale JPEGs
are converted to RGB. Decoding the 110,000 JPEGs takes a while, so the arrays are converted once
and cached (``<cache_dir>/datasets/tinyimagenet-<key>.npz``, keyed by the files' sizes and
modification times).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cl_runner.errors import DataError

FOLDER = "tiny-imagenet-200"
SIZE = 64


def _root(data_dir: Path) -> Path | None:
    for folder in (Path(data_dir) / FOLDER, Path(data_dir) / "tinyimagenet" / FOLDER):
        if (folder / "wnids.txt").is_file() and (folder / "val" / "val_annotations.txt").is_file() \
                and (folder / "train").is_dir() and (folder / "val" / "images").is_dir():
            return folder
    return None


def find_files(data_dir: Path, name: str = "tinyimagenet") -> dict[str, Path] | None:
    """The index files and image folders that identify this copy, or None when it is missing."""
    root = _root(data_dir)
    if root is None:
        return None
    return {"wnids": root / "wnids.txt", "val_annotations": root / "val" / "val_annotations.txt",
            "train": root / "train", "val_images": root / "val" / "images"}


def missing_message(data_dir: Path, why: str) -> str:
    return (f"tinyimagenet was not found under data_dir={data_dir} ({why}). Download "
            f"http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it in {data_dir} so that "
            f"{Path(data_dir) / FOLDER}/ holds wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG "
            f"and val/val_annotations.txt, or point data_dir at a folder that has them (data_dir=/path "
            f"or env CLRUN_DATA_DIR). torchvision does not download Tiny ImageNet.")


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (SIZE, SIZE):
                raise DataError(f"{path} is {im.size[0]}x{im.size[1]}; Tiny ImageNet images are "
                                f"{SIZE}x{SIZE}. Is this the tiny-imagenet-200 folder?")
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except DataError:
        raise
    except Exception as ex:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise DataError(f"{path} cannot be decoded as a JPEG image ({type(ex).__name__}: {ex}); the "
                        f"file is truncated or corrupt: unzip tiny-imagenet-200.zip again.") from None


def _decode_all(paths: list[Path]) -> np.ndarray:
    out = np.empty((len(paths), 3, SIZE, SIZE), dtype=np.uint8)
    if not paths:
        return out
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, img in enumerate(pool.map(_decode, paths, chunksize=256)):
            out[i] = img
    return out


def read_index(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(sorted wnids, [(train image, label)], [(val image, label)]) from the folder's index files."""
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().splitlines() if w.strip()})
    if not wnids:
        raise DataError(f"{root / 'wnids.txt'} is empty; it should list the 200 WordNet ids.")
    label = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        folder = root / "train" / w / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise DataError(f"no training images for class {w}: {folder}/*.JPEG is missing. The "
                            f"tiny-imagenet-200 folder is incomplete: unzip it again.")
        train += [(p, label[w]) for p in files]
    val = []
    ann = root / "val" / "val_annotations.txt"
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DataError(f"{ann} line {n} is not '<file> TAB <wnid> ...' with a wnid of wnids.txt: "
                            f"{line!r} (the file is corrupt).")
        p = root / "val" / "images" / fields[0]
        if not p.is_file():
            raise DataError(f"{p} is listed in {ann} but missing: unzip tiny-imagenet-200.zip again.")
        val.append((p, label[fields[1]]))
    return wnids, train, val


def _cache_path(root: Path, train, val) -> Path:
    from cl_runner.data.datasets import default_cache_dir

    h = hashlib.sha256()
    for p in (root / "wnids.txt", root / "val" / "val_annotations.txt"):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps([[p.name, y, p.stat().st_size] for p, y in train + val]).encode())
    return default_cache_dir() / "datasets" / f"tinyimagenet-{h.hexdigest()[:16]}.npz"


def load(name: str, data_dir: Path, download: bool = True):
    """Tiny ImageNet as an :class:`ImageDataset` (train: the train split, test: the val split)."""
    from cl_runner.data.cifar import channel_stats
    from cl_runner.data.datasets import ImageDataset

    root = _root(data_dir)
    if root is None:
        raise DataError(missing_message(data_dir, "no tiny-imagenet-200 folder with wnids.txt, train/, "
                                                  "val/images/ and val/val_annotations.txt"))
    wnids, train, val = read_index(root)
    cache = _cache_path(root, train, val)
    arrays = None
    if cache.is_file():
        try:
            with np.load(cache) as z:
                arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
        except (OSError, ValueError, KeyError):
            arrays = None  # a damaged cache entry is converted again
    if arrays is None:
        arrays = {"train_x": _decode_all([p for p, _ in train]),
                  "train_y": np.array([y for _, y in train], dtype=np.int64),
                  "test_x": _decode_all([p for p, _ in val]),
                  "test_y": np.array([y for _, y in val], dtype=np.int64)}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=cache.parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache is not an error; the next run converts again
    mean, std = channel_stats(arrays["train_x"])
    return ImageDataset(name=name, num_classes=len(wnids), mean=mean, std=std, **arrays)
