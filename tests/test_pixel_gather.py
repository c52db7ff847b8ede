"""Pixel-remap tasks (benchmarks/pixels.py): the gather paths (C, torch.index_select, NumPy)
against the definition and against the transforms they replace, the choice of path and its
record, and the stream cache that stores the remap instead of the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from cl_runner.benchmarks import build_stream, builder, pixels
from cl_runner.benchmarks.pixels import PixelGather, gather_all, rotation_index
from cl_runner.benchmarks.transforms import permute_pixels, rotate
from cl_runner.config import validate_config
from cl_runner.data.datasets import load_image_dataset
from cl_runner.errors import ConfigError

needs_library = pytest.mark.skipif(pixels.library() is None,
                                   reason=f"native gather unavailable: {pixels.unavailable_reason()}")


def images(n, c, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def by_hand(base, g: PixelGather) -> np.ndarray:
    """The definition, one pixel at a time."""
    rows = range(len(base)) if g.rows is None else g.rows
    n, c, h, w = len(rows), *base.shape[1:]
    out = np.zeros((n, c, h * w), dtype=np.uint8)
    flat = base.reshape(len(base), c, h * w)
    for i, r in enumerate(rows):
        for j, k in enumerate(g.index):
            if k >= 0:
                out[i, :, j] = flat[r, :, k]
    return out.reshape(n, c, h, w)


@pytest.mark.parametrize("path", pixels.PATHS)
@pytest.mark.parametrize("shape", [(1, 5, 5), (3, 4, 6), (1, 28, 28), (2, 3, 3)])
def test_gather_matches_the_definition(path, shape):
    if path == "c" and pixels.library() is None:
        pytest.skip(f"native gather unavailable: {pixels.unavailable_reason()}")
    rng = np.random.default_rng(1)
    c, h, w = shape
    base = images(9, c, h, w)
    index = rng.integers(-1, h * w, size=h * w).astype(np.int32)  # -1: a pixel from outside
    gathers = [PixelGather("a", index), PixelGather("a", index, np.array([8, 0, 3, 3], dtype=np.int64)),
               PixelGather("a", index, np.zeros(0, dtype=np.int64))]
    record = {}
    outs = gather_all({"a": base}, gathers, threads=2, path=path, record=record)
    assert record["path"] == path
    for g, out in zip(gathers, outs):
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, by_hand(base, g))


@needs_library
def test_native_and_numpy_agree_over_many_chunks(monkeypatch):
    monkeypatch.setattr(pixels, "CHUNK_ROWS", 7)  # many jobs, split unevenly between threads
    base = images(100, 1, 28, 28, seed=2)
    index = rotation_index(33.0, 28, 28)
    rows = np.sort(np.random.default_rng(3).choice(100, size=61, replace=False)).astype(np.int64)
    gathers = [PixelGather("b", index), PixelGather("b", index, rows)]
    fast = gather_all({"b": base}, gathers, path="c", threads=3)
    slow = gather_all({"b": base}, gathers, native=False, threads=1)
    with_torch = gather_all({"b": base}, gathers, path="torch", threads=3)
    for a, b, t in zip(fast, slow, with_torch):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(t, b)


@pytest.mark.parametrize("angle", [0.0, 9.0, 45.0, 90.0, 171.0, 270.5, -30.0])
def test_rotation_index_is_the_nearest_rotation(angle):
    base = images(6, 1, 28, 28, seed=4)
    out, = gather_all({"x": base}, [PixelGather("x", rotation_index(angle, 28, 28))])
    np.testing.assert_array_equal(out, rotate(base, angle, "nearest"))


def test_bad_gathers_are_refused():
    base = images(4, 1, 3, 3)
    ok = np.arange(9, dtype=np.int32)
    for g, match in [(PixelGather("x", ok.astype(np.int64)), "int32"),
                     (PixelGather("x", ok[:8]), "shape"),
                     (PixelGather("x", ok + 1), r"\[-1, 9\)"),
                     (PixelGather("x", ok - 2), r"\[-1, 9\)"),
                     (PixelGather("x", ok, np.array([4], dtype=np.int64)), r"\[0, 4\)"),
                     (PixelGather("x", ok, np.array([0], dtype=np.int32)), "int64")]:
        with pytest.raises(ValueError, match=match):
            gather_all({"x": base}, [g])
    with pytest.raises(ValueError, match="uint8"):
        gather_all({"x": base.astype(np.float32)}, [PixelGather("x", ok)])


def test_without_a_compiler_numpy_gathers(tmp_path, monkeypatch):
    monkeypatch.setattr(pixels, "_library", None)
    monkeypatch.setattr(pixels, "_unavailable", None)
    monkeypatch.setenv("CLRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pixels.cbuild, "compiler", lambda: None)
    monkeypatch.setattr(pixels, "AUTO_ORDER", ("c", "numpy"))  # an order that tries C first
    assert pixels.library() is None and "no C compiler" in pixels.unavailable_reason()
    base = images(5, 1, 28, 28)
    record = {}
    out, = gather_all({"x": base}, [PixelGather("x", rotation_index(20.0, 28, 28))], record=record)
    np.testing.assert_array_equal(out, rotate(base, 20.0, "nearest"))
    assert not list((tmp_path / "cache").rglob("*.so"))
    # the fallback is recorded with its reason; asking for the C path by name is an error
    assert record["path"] == "numpy" and "c unavailable (no C compiler" in record["why"]
    monkeypatch.setenv("CLRUN_GATHER", "c")
    with pytest.raises(ConfigError, match="CLRUN_GATHER=c: the C gather is unavailable here"):
        gather_all({"x": base}, [PixelGather("x", rotation_index(20.0, 28, 28))])


def test_the_gather_path_is_chosen_by_CLRUN_GATHER(monkeypatch):
    monkeypatch.setenv("CLRUN_GATHER", "torch")
    assert pixels.choose() == ("torch", "$CLRUN_GATHER=torch: torch.index_select")
    monkeypatch.setenv("CLRUN_GATHER", "numpy")
    assert pixels.choose()[0] == "numpy"
    monkeypatch.setenv("CLRUN_GATHER", "fast")
    with pytest.raises(ConfigError, match="CLRUN_GATHER=fast is not a gather path"):
        pixels.choose()
    monkeypatch.delenv("CLRUN_GATHER")
    path, why = pixels.choose()
    expected = next(p for p in pixels.AUTO_ORDER if p != "c" or pixels.library() is not None)
    assert path == expected and why.startswith("$CLRUN_GATHER=auto")


# -- streams and their cache --------------------------------------------------------------------

def bcfg(**kw):
    return validate_config({"benchmark": kw})[0].benchmark


@pytest.fixture(scope="module")
def ds(tiny_data_dir):
    return load_image_dataset("mnist", tiny_data_dir, download=False)


STREAMS = [
    dict(name="rotatedmnist", num_tasks=3, per_task_rotation=40),
    dict(name="rotatedmnist", num_tasks=2, rotation_jitter="task", subset=50, test_subset=20),
    dict(name="permutedmnist", num_tasks=3, subset=70, first_task_unpermuted=True),
    dict(name="permutedmnist", num_tasks=2, scenario="task_il"),
]


@pytest.mark.parametrize("kw", STREAMS)
def test_remapped_tasks_are_cached_as_their_plan(tiny_data_dir, tmp_path, ds, kw, monkeypatch):
    cfg = bcfg(cache=True, **kw)
    first = build_stream(cfg, 3, tiny_data_dir, tmp_path)
    assert first.plan is not None
    entry = next((tmp_path / "streams").iterdir())
    names = {f.name for f in entry.iterdir()}
    assert {"base_train.npy", "base_test.npy", "task0_train_x_index.npy"} <= names
    assert not any(n.endswith(("_train_x.npy", "_test_x.npy")) for n in names)  # no pixels stored

    monkeypatch.setattr(builder, "load_image_dataset", lambda *a, **k: pytest.fail("must come from the cache"))
    second = build_stream(cfg, 3, tiny_data_dir, tmp_path)
    for a, b in zip(first.tasks, second.tasks):
        assert a.info == b.info
        for part in ("train_x", "train_y", "test_x", "test_y", "classes"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
            assert getattr(a, part).dtype == getattr(b, part).dtype

    # ... and equal the transforms applied to the source images, rows drawn as before.
    for t in first.tasks:
        g = first.plan.parts[(t.id, "train_x")]
        src = ds.train_x if g.rows is None else ds.train_x[g.rows]
        if kw["name"] == "rotatedmnist":
            expected = rotate(src, t.info["angle"], "nearest")
        else:
            expected = permute_pixels(src, g.index.astype(np.int64))
            assert (g.index == np.arange(784)).all() == (t.id == 0 and kw.get("first_task_unpermuted", False))
        np.testing.assert_array_equal(t.train_x, expected)
        np.testing.assert_array_equal(t.train_y % 10, ds.train_y if g.rows is None else ds.train_y[g.rows])


def test_subsets_draw_the_rows_take_subset_draws(tiny_data_dir, ds):
    s = build_stream(bcfg(name="permutedmnist", num_tasks=2, subset=30, cache=False), 5, tiny_data_dir)
    for t in s.tasks:
        x, y = builder.take_subset(ds.train_x, ds.train_y, 30, builder.task_rng(5, t.id, 1))
        np.testing.assert_array_equal(t.train_y, y)
        np.testing.assert_array_equal(t.train_x, permute_pixels(x, s.plan.parts[(t.id, "train_x")].index))


@pytest.mark.parametrize("kw", [dict(rotation_jitter=True), dict(interpolation="bilinear"), dict(pad_to=32)])
def test_other_streams_store_their_pixels(tiny_data_dir, tmp_path, kw):
    cfg = bcfg(name="rotatedmnist", num_tasks=2, cache=True, **kw)
    first = build_stream(cfg, 0, tiny_data_dir, tmp_path)
    assert first.plan is None
    entry = next((tmp_path / "streams").iterdir())
    assert (entry / "task1_train_x.npy").is_file() and not (entry / "base_train.npy").exists()
    second = build_stream(cfg, 0, tiny_data_dir, tmp_path)
    for a, b in zip(first.tasks, second.tasks):
        np.testing.assert_array_equal(a.train_x, b.train_x)
        np.testing.assert_array_equal(a.test_x, b.test_x)
