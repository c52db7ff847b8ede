"""CIFAR-10/100 and Tiny ImageNet loaders, the split benchmarks built on them, and the on-device
crop + flip augmentation of both backends."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cl_runner.benchmarks.builder import build_stream
from cl_runner.config.schema import BenchmarkConfig
from cl_runner.data import tinyimagenet
from cl_runner.data.datasets import load_image_dataset
from cl_runner.errors import ConfigError, DataError
from tests.conftest import REPO, read_results, run_clrun

# -- writing small files in the official formats --------------------------------------------


def colour_images(y: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Learnable colour images (N, 3, size, size): class c lights a block whose place and colour
    depend on c, over noise."""
    x = rng.integers(0, 50, size=(len(y), 3, size, size)).astype(np.uint8)
    b = size // 4
    for c in np.unique(y):
        r, col, ch = (c // 4) % 4 * b, c % 4 * b, c % 3
        x[y == c, ch, r:r + b, col:col + b] = 250
    return x


def write_cifar(root: Path, name: str, n_train: int = 100, n_test: int = 40, seed: int = 0) -> dict:
    """Pickled batches as in cifar-10-python.tar.gz / cifar-100-python.tar.gz; returns the arrays."""
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    ytr = np.tile(np.arange(k), -(-n_train // k))[:n_train]
    yte = np.tile(np.arange(k), -(-n_test // k))[:n_test]
    xtr, xte = colour_images(ytr, rng), colour_images(yte, rng)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        label_key = b"labels"
        chunks = np.array_split(np.arange(n_train), 5)
        files = {f"data_batch_{i + 1}": idx for i, idx in enumerate(chunks)}
        tests = {"test_batch": None}
    else:
        folder = root / "cifar-100-python"
        label_key = b"fine_labels"
        files, tests = {"train": np.arange(n_train)}, {"test": None}
    folder.mkdir(parents=True, exist_ok=True)
    for fname, idx in files.items():
        d = {b"batch_label": fname.encode(), b"data": xtr[idx].reshape(len(idx), -1),
             label_key: [int(v) for v in ytr[idx]]}
        if name == "cifar100":
            d[b"coarse_labels"] = [int(v) // 5 for v in ytr[idx]]
        (folder / fname).write_bytes(pickle.dumps(d, protocol=2))
    for fname in tests:
        d = {b"data": xte.reshape(len(xte), -1), label_key: [int(v) for v in yte]}
        (folder / fname).write_bytes(pickle.dumps(d, protocol=2))
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte, "folder": folder}


def write_tinyimagenet(root: Path, wnids: list[str], per_class: int = 3, seed: int = 0) -> Path:
    """The tiny-imagenet-200 folder layout with flat-colour JPEGs (exact after JPEG coding up to
    a level or two); val_i has class i % len(wnids)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    top = root / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        folder = top / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            Image.new("RGB", (64, 64), colour).save(folder / f"{w}_{i}.JPEG", quality=100)
        (top / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i in range(2 * len(wnids)):
        w = wnids[i % len(wnids)]
        Image.new("RGB", (64, 64), (10 * i, 100, 200)).save(top / "val" / "images" / f"val_{i}.JPEG", quality=100)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return top


def bench(name: str, **kw):
    return OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), {"name": name, **kw})


# -- CIFAR loaders ------------------------------------------------------------------------------


def test_cifar10_pickles_load_in_channel_row_major_order(tmp_path):
    ref = write_cifar(tmp_path, "cifar10", n_train=50, n_test=20)
    ds = load_image_dataset("cifar10", tmp_path, download=False)
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (20, 3, 32, 32)
    # The five batches are concatenated in order; pixel (c, r, col) is data[c*1024 + r*32 + col].
    np.testing.assert_array_equal(ds.train_x, ref["train_x"])
    np.testing.assert_array_equal(ds.train_y, ref["train_y"])
    flat = ref["train_x"].reshape(50, -1)
    assert ds.train_x[7, 2, 5, 9] == flat[7, 2 * 1024 + 5 * 32 + 9]
    assert ds.num_classes == 10
    # Per-channel statistics of the training images on the [0, 1] scale.
    x = ref["train_x"].astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 2, 3)), rtol=1e-7)


def test_cifar100_reads_fine_labels_and_splits_10x10_and_20x5(tmp_path):
    ref = write_cifar(tmp_path, "cifar100", n_train=300, n_test=200)
    ds = load_image_dataset("cifar100", tmp_path, download=False)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.train_y, ref["train_y"])
    s10 = build_stream(bench("splitcifar100"), 0, tmp_path, use_cache=False)
    assert s10.num_tasks == 10 and s10.num_outputs == 100 and s10.input_shape == (3, 32, 32)
    assert s10.tasks[3].classes.tolist() == list(range(30, 40))
    assert set(np.unique(s10.tasks[3].train_y)) == set(range(30, 40))
    assert s10.tasks[3].num_train == 30 and s10.tasks[3].num_test == 20
    s20 = build_stream(bench("splitcifar100", num_tasks=20, scenario="task_il"), 0, tmp_path, use_cache=False)
    assert s20.num_tasks == 20 and s20.masks_logits
    assert s20.tasks[19].classes.tolist() == [95, 96, 97, 98, 99]
    # class_order: seed gives a permutation of the 100 classes drawn from the seed.
    a = build_stream(bench("splitcifar100", class_order="seed"), 1, tmp_path, use_cache=False)
    b = build_stream(bench("splitcifar100", class_order="seed"), 2, tmp_path, use_cache=False)
    order_a = np.concatenate([t.classes for t in a.tasks])
    assert sorted(order_a.tolist()) == list(range(100)) and order_a.tolist() != list(range(100))
    assert order_a.tolist() != np.concatenate([t.classes for t in b.tasks]).tolist()
    with pytest.raises(ConfigError, match="do not split evenly"):
        build_stream(bench("splitcifar100", num_tasks=7), 0, tmp_path, use_cache=False)


def test_splitcifar10_stream_is_cached_with_the_training_statistics(tmp_path):
    write_cifar(tmp_path, "cifar10", n_train=100, n_test=40)
    s = build_stream(bench("splitcifar10"), 0, tmp_path, cache_dir=tmp_path / "cache")
    assert [t.classes.tolist() for t in s.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    again = build_stream(bench("splitcifar10"), 0, tmp_path, cache_dir=tmp_path / "cache")
    assert again.mean == s.mean and again.std == s.std and len(s.mean) == 3
    np.testing.assert_array_equal(again.tasks[2].train_x, s.tasks[2].train_x)
    assert isinstance(again.tasks[2].train_x, np.memmap)  # read back from the cache


def test_missing_cifar_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as ex:
        load_image_dataset("cifar10", tmp_path, download=False)
    msg = str(ex.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "torchvision" in msg


def test_truncated_or_foreign_cifar_file_is_a_clear_error(tmp_path):
    ref = write_cifar(tmp_path, "cifar10", n_train=50, n_test=20)
    path = ref["folder"] / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR pickle.*truncated or corrupt"):
        load_image_dataset("cifar10", tmp_path, download=False)
    # A CIFAR-100 file where CIFAR-10's is expected: the label key is missing.
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(DataError, match="b'labels'"):
        load_image_dataset("cifar10", tmp_path, download=False)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        load_image_dataset("cifar10", tmp_path, download=False)


# -- Tiny ImageNet ----------------------------------------------------------------------------


def test_tinyimagenet_folder_layout_is_read_with_sorted_wnids_and_val_as_test(tmp_path, monkeypatch):
    from PIL import Image

    wnids = ["n03", "n01", "n02", "n04"]  # wnids.txt is not sorted; classes follow sorted order
    top = write_tinyimagenet(tmp_path, wnids, per_class=3)
    # A grey-scale JPEG (some official images are) becomes 3 equal channels.
    Image.new("L", (64, 64), 77).save(top / "train" / "n02" / "images" / "n02_1.JPEG", quality=100)
    ds = load_image_dataset("tinyimagenet", tmp_path, download=False)
    assert ds.num_classes == 4 and ds.train_x.shape == (12, 3, 64, 64) and ds.test_x.shape == (8, 3, 64, 64)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # val_i is annotated with wnids[i % 4]: n03 -> 2, n01 -> 0, n02 -> 1, n04 -> 3.
    assert ds.test_y.tolist() == [2, 0, 1, 3, 2, 0, 1, 3]
    grey = ds.train_x[4]  # n02 (class 1), image 1
    assert np.abs(grey.astype(int) - 77).max() <= 1 and (grey[0] == grey[2]).all()
    val5 = ds.test_x[5].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(val5, [50, 100, 200], atol=2)
    # Converted once: the second load reads the cached arrays without decoding any JPEG.
    monkeypatch.setattr(tinyimagenet, "_decode", lambda p: pytest.fail(f"decoded {p} again"))
    again = load_image_dataset("tinyimagenet", tmp_path, download=False)
    np.testing.assert_array_equal(again.train_x, ds.train_x)
    assert again.mean == ds.mean


def test_splittinyimagenet_stream(tmp_path):
    write_tinyimagenet(tmp_path, [f"n{i:02d}" for i in range(6)], per_class=2)
    s = build_stream(bench("splittinyimagenet", num_tasks=3, scenario="task_il"), 0, tmp_path, use_cache=False)
    assert s.num_tasks == 3 and s.num_outputs == 6 and s.input_shape == (3, 64, 64)
    assert [t.classes.tolist() for t in s.tasks] == [[0, 1], [2, 3], [4, 5]]
    assert s.tasks[1].num_train == 4 and s.tasks[1].num_test == 4


def test_tinyimagenet_corrupt_or_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="tiny-imagenet-200.zip"):
        load_image_dataset("tinyimagenet", tmp_path, download=False)
    top = write_tinyimagenet(tmp_path, ["n01", "n02"], per_class=2)
    bad = top / "train" / "n02" / "images" / "n02_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match="n02_1.JPEG cannot be decoded.*truncated or corrupt"):
        load_image_dataset("tinyimagenet", tmp_path, download=False)
    (top / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1 .*wnid of wnids.txt"):
        load_image_dataset("tinyimagenet", tmp_path, download=False)


# -- augmentation -------------------------------------------------------------------------------


def _torch_aug(x, padding, seed=0, fill=None, flip=True):
    import torch

    from cl_runner.backends.torch.augment import random_crop_flip

    g = torch.Generator().manual_seed(seed)
    return random_crop_flip(torch.as_tensor(x), padding, g, None if fill is None else torch.as_tensor(fill),
                            flip=flip).numpy()


def _jax_aug(x, padding, seed=0, fill=None, flip=True):
    import jax

    from cl_runner.backends.jax.augment import random_crop_flip

    fn = jax.jit(lambda k, v: random_crop_flip(k, v, padding, fill, flip=flip))
    return np.asarray(fn(jax.random.PRNGKey(seed), x))


def _windows(img: np.ndarray, p: int, fill=0.0) -> list[np.ndarray]:
    """Every crop of ``img`` (C, H, W) padded by p, and its mirror image, built by hand."""
    c, h, w = img.shape
    padded = np.full((c, h + 2 * p, w + 2 * p), fill, img.dtype)
    padded[:, p:p + h, p:p + w] = img
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            win = padded[:, dy:dy + h, dx:dx + w]
            out += [win, win[:, :, ::-1]]
    return out


@pytest.mark.parametrize("aug", [_torch_aug, _jax_aug], ids=["torch", "jax"])
def test_crop_is_a_shifted_window_with_zero_padding_and_flip_reverses(aug):
    img = np.arange(1, 2 * 4 * 5 + 1, dtype=np.float32).reshape(1, 2, 4, 5)  # C=2, H=4, W=5
    x = np.repeat(img, 64, axis=0)
    out = aug(x, 2)
    assert out.shape == (64, 2, 4, 5)
    # Hand-checked example: offset (dy, dx) = (0, 3) of the image padded by 2 is rows -2..1 and
    # columns 1..5 of the original (zeros outside).
    window = _windows(img[0], 2)[2 * (0 * 5 + 3)]
    assert window[0].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [2, 3, 4, 5, 0], [7, 8, 9, 10, 0]]
    candidates = _windows(img[0], 2)
    seen = set()
    for o in out:
        hits = [i for i, cand in enumerate(candidates) if np.array_equal(o, cand)]
        assert hits, f"output is not a padded window of the input or its mirror:\n{o}"
        seen.update(hits)
    assert len(seen) > 10  # offsets and flips vary across the batch
    # Padding 0: only flips. A flipped image equals the reversed one.
    only_flip = aug(x[:32], 0)
    flipped = [np.array_equal(o, img[0][:, :, ::-1]) for o in only_flip]
    kept = [np.array_equal(o, img[0]) for o in only_flip]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    # No flip, padding 1: one of the 9 windows, never mirrored.
    plain = aug(x[:16], 1, flip=False)
    straight = _windows(img[0], 1)[0::2]
    assert all(any(np.array_equal(o, w) for w in straight) for o in plain)


@pytest.mark.parametrize("aug", [_torch_aug, _jax_aug], ids=["torch", "jax"])
def test_padding_takes_the_per_channel_fill(aug):
    x = np.ones((200, 3, 8, 8), np.float32)
    fill = np.array([-1.0, -2.0, -3.0], np.float32)  # the normalised value of a black pixel
    out = aug(x, 4, seed=3, fill=fill)
    values = {c: set(np.unique(out[:, c]).tolist()) for c in range(3)}
    assert values == {0: {1.0, -1.0}, 1: {1.0, -2.0}, 2: {1.0, -3.0}}
    # The fraction of padded pixels over all draws is close to its expectation: offsets uniform in
    # {0..8} per axis, so E[kept rows] = E[8 - |d - 4|] = 8 - 20/9 per axis.
    kept = (out[:, 0] == 1.0).mean()
    assert abs(kept - ((8 - 20 / 9) / 8) ** 2) < 0.03


def _same_image_stream(side=5):
    """One task whose training images are all the same colour image (3 channels)."""
    from cl_runner.benchmarks.stream import Stream, Task

    img = np.arange(3 * side * side, dtype=np.uint8).reshape(1, 3, side, side) * 3
    x = np.repeat(img, 16, axis=0)
    y = np.tile([0, 1], 8).astype(np.int64)
    task = Task(id=0, train_x=x, train_y=y, test_x=x[:4], test_y=y[:4], classes=np.array([0, 1]))
    return Stream(name="same", scenario="class_il", tasks=[task], num_outputs=2, input_shape=(3, side, side),
                  mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)), img


def _check_windows(batches, img, mean, std, padding):
    norm = (img[0].astype(np.float32) / 255.0 - np.array(mean, np.float32)[:, None, None]) \
        / np.array(std, np.float32)[:, None, None]
    # torchvision pads the raw image with black (0) before normalising: -mean/std per channel.
    fill = -np.array(mean, np.float32) / np.array(std, np.float32)
    padded = np.repeat(np.repeat(fill[:, None, None], 5 + 2 * padding, 1), 5 + 2 * padding, 2)
    padded[:, padding:padding + 5, padding:padding + 5] = norm
    candidates = [w for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                  for w0 in [padded[:, dy:dy + 5, dx:dx + 5]] for w in (w0, w0[:, :, ::-1])]
    rows = [r for b in batches for r in b]
    assert len(rows) == 16
    found = [next((i for i, c in enumerate(candidates) if np.allclose(r, c, atol=1e-6)), None) for r in rows]
    assert None not in found, "a training input is not a padded, possibly mirrored, window of the image"
    assert len(set(found)) > 3  # the crops differ from batch to batch and sample to sample


def test_torch_learner_augments_each_training_batch():
    import torch

    from cl_runner import catalog
    from cl_runner.config import validate_config

    stream, img = _same_image_stream()
    cfg = validate_config({"algo": {"name": "naive"}, "backbone": {"width": 8},
                           "benchmark": {"batch_size": 8, "augment": True, "crop_padding": 2}})[0]
    tl = catalog.load_backend("torch").build_learner(cfg, stream, torch.device("cpu"), 0)
    seen = []
    step = tl.train_step
    tl.train_step = lambda x, y, t: (seen.append(x.numpy().copy()), step(x, y, t))[1]
    tl.on_before_task(stream.tasks[0])
    tl.train_epoch(stream.tasks[0], 0)
    _check_windows(seen, img, stream.mean, stream.std, 2)
    # Evaluation sees the images as they are.
    np.testing.assert_array_equal(tl.test_tensors(stream.tasks[0])[0].numpy(), tl.to_input(img.repeat(4, 0)).numpy())


def test_jax_learner_augments_each_training_batch(monkeypatch):
    import jax.numpy as jnp

    from cl_runner import catalog
    from cl_runner.backends.jax import learner as jax_learner_module
    from cl_runner.config import validate_config

    stream, img = _same_image_stream()
    cfg = validate_config({"backend": {"name": "jax"}, "algo": {"name": "naive"}, "backbone": {"width": 8},
                           "benchmark": {"batch_size": 8, "augment": True, "crop_padding": 2}})[0]
    backend = catalog.load_backend("jax")
    jl = backend.build_learner(cfg, stream, backend.resolve_device("cpu"), 0)
    seen = []
    original = jax_learner_module.random_crop_flip

    def record(*args):
        out = original(*args)
        seen.append(np.asarray(out))
        return out

    monkeypatch.setattr(jax_learner_module, "random_crop_flip", record)
    jl.on_before_task(stream.tasks[0])
    carry, x, y, t, mask = jl.epoch_inputs()
    for batch in (jnp.arange(8), jnp.arange(8, 16)):  # two steps, run eagerly to see the inputs
        carry, _ = jl.train_step(carry, batch, None, x, y, t, mask)
    _check_windows(seen, img, stream.mean, stream.std, 2)


def test_clrun_splitcifar10_with_augmentation(tmp_path):
    """End to end from the config group: Split CIFAR-10 (augment on by default) learns above
    chance on a tiny learnable copy."""
    write_cifar(tmp_path, "cifar10", n_train=400, n_test=100)
    out = tmp_path / "run"
    r = run_clrun(["benchmark=splitcifar10", "backbone=cnn", "backbone.channels=[8,8]", "backbone.width=32",
                   "algo=naive", "benchmark.batch_size=16", "benchmark.scenario=task_il", "optimizer.lr=0.05",
                   "training.epochs_per_task=2", "progress=false", "checkpoint=false", "loggers=[console]",
                   "threads=1", f"data_dir={tmp_path}", f"hydra.run.dir={out}"], cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(out)
    assert res["config"]["benchmark"]["augment"] is True
    assert res["avg_acc"] > 70.0  # task-IL chance: 50%
