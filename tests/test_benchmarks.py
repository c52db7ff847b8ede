"""Streams: rotation (against PIL), permutations, splits, subsets, label spaces, cache, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from cl_runner.benchmarks import build_stream, builder, mnist
from cl_runner.benchmarks.builder import cache_key
from cl_runner.benchmarks.pixels import rotation_index
from cl_runner.benchmarks.transforms import pad, permute_pixels, rotate
from cl_runner.config import validate_config
from cl_runner.data.datasets import load_image_dataset
from cl_runner.errors import ConfigError

from conftest import write_tiny_dataset


def bcfg(**kw):
    """A validated benchmark config (no disk cache unless asked)."""
    kw.setdefault("cache", False)
    return validate_config({"benchmark": kw})[0].benchmark


@pytest.fixture(scope="module")
def mnist_ds(tiny_data_dir):
    return load_image_dataset("mnist", tiny_data_dir, download=False)


def build(tiny_data_dir, seed=0, cache_dir=None, **kw):
    return build_stream(bcfg(**kw), seed, tiny_data_dir, cache_dir)


# -- rotation -----------------------------------------------------------------------------------

def pil_rotate(images: np.ndarray, angles) -> np.ndarray:
    Image = pytest.importorskip("PIL.Image")
    angles = np.broadcast_to(np.asarray(angles, dtype=float), (len(images),))
    return np.stack([np.asarray(Image.fromarray(im[0]).rotate(float(a))) for im, a in zip(images, angles)])[:, None]


@pytest.mark.parametrize("angle", [0, 9, 18, 45, 90, 135, 171, 180, 225, 270, -30, 359.5, 12.345, 400])
def test_rotation_matches_pil_nearest(angle):
    rng = np.random.default_rng(int(abs(angle) * 1000))
    x = rng.integers(0, 256, size=(16, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(rotate(x, angle), pil_rotate(x, angle))


@pytest.mark.parametrize("shape", [(27, 31), (32, 32)])
@pytest.mark.parametrize("angle", [9, 45, 90, 171])
def test_rotation_matches_pil_other_sizes(shape, angle):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(4, 1) + shape, dtype=np.uint8)
    np.testing.assert_array_equal(rotate(x, angle), pil_rotate(x, angle))


def test_rotation_per_image_angles_match_pil():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(300, 1, 28, 28), dtype=np.uint8)
    angles = rng.uniform(0, 360, size=300)
    # chunk=64: several chunks, the last one partial.
    np.testing.assert_array_equal(rotate(x, angles, chunk=64), pil_rotate(x, angles))
    with pytest.raises(ValueError):
        rotate(x, angles[:10])


def test_rotation_by_multiples_of_90_is_exact():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(5, 2, 28, 28), dtype=np.uint8)  # two channels rotate alike
    for k in range(4):
        expected = np.rot90(x, k, axes=(2, 3))  # counter-clockwise
        np.testing.assert_array_equal(rotate(x, 90 * k), expected)
        np.testing.assert_array_equal(rotate(x, 90 * k, "bilinear"), expected)


def test_rotation_direction_and_fill():
    # A single bright pixel right of the centre moves above the centre (counter-clockwise).
    x = np.zeros((1, 1, 28, 28), np.uint8)
    x[0, 0, 14, 20] = 255
    y = rotate(x, 90)
    assert y[0, 0, 7, 14] == 255 and y.sum() == 255
    # Corners come from outside the image and are 0.
    full = np.full((1, 1, 28, 28), 200, np.uint8)
    r = rotate(full, 45)
    assert r[0, 0, 0, 0] == 0 and r[0, 0, 14, 14] == 200


def test_bilinear_is_an_interpolation():
    x = np.full((1, 1, 28, 28), 100, np.uint8)
    r = rotate(x, 30, "bilinear")
    assert r[0, 0, 10:18, 10:18].min() == 100 and r[0, 0, 10:18, 10:18].max() == 100
    with pytest.raises(ValueError):
        rotate(x, 30, "bicubic")


def test_rotated_stream_angles(tiny_data_dir, mnist_ds):
    s = build(tiny_data_dir, name="rotatedmnist", num_tasks=4, per_task_rotation=22.5)
    assert [t.info["angle"] for t in s.tasks] == [0.0, 22.5, 45.0, 67.5]
    for t in s.tasks:
        np.testing.assert_array_equal(t.test_x, rotate(mnist_ds.test_x, 22.5 * t.id))
        np.testing.assert_array_equal(t.train_x, rotate(mnist_ds.train_x, 22.5 * t.id))
        np.testing.assert_array_equal(t.train_y, mnist_ds.train_y)  # domain-IL: labels unchanged
    np.testing.assert_array_equal(s.tasks[0].train_x, mnist_ds.train_x)


def test_rotation_jitter_angles_stay_in_bins(tiny_data_dir, monkeypatch):
    seen = []

    def spy(images, angles, interpolation="nearest"):
        seen.append(np.broadcast_to(np.asarray(angles, dtype=float), (len(images),)).copy())
        return rotate(images, angles, interpolation)

    monkeypatch.setattr(mnist, "rotate", spy)
    s = build(tiny_data_dir, name="rotatedmnist", num_tasks=3, per_task_rotation=30, rotation_jitter=True)
    assert len(seen) == 6  # train and test of each task
    for t in range(3):
        assert s.tasks[t].info["angle_range"] == [30.0 * t, 30.0 * (t + 1)]
        for angles in seen[2 * t: 2 * t + 2]:
            assert angles.min() >= 30 * t and angles.max() < 30 * (t + 1)
            assert angles.std() > 5  # spread over the bin, not one angle
    assert len(seen[0]) == 600 and len(seen[1]) == 200


def test_rotation_jitter_task_draws_one_angle_per_task(tiny_data_dir, mnist_ds, monkeypatch):
    """GEM's protocol: one angle per task, uniform inside the task's bin, the same for its train
    and test images; different seeds draw different angles."""
    seen = []

    def spy(angle, h, w):
        seen.append(angle)
        return rotation_index(angle, h, w)

    monkeypatch.setattr(mnist, "rotation_index", spy)
    s = build(tiny_data_dir, name="rotatedmnist", num_tasks=3, per_task_rotation=30, rotation_jitter="task")
    assert len(seen) == 3
    for t, angle in enumerate(seen):
        assert 30 * t <= angle < 30 * (t + 1) and angle != 30 * t
        assert s.tasks[t].info["angle"] == angle
        # Train and test images are both rotated by the task's angle.
        assert np.array_equal(s.tasks[t].train_x, rotate(mnist_ds.train_x, angle))
        assert np.array_equal(s.tasks[t].test_x, rotate(mnist_ds.test_x, angle))
    first = list(seen)
    seen.clear()
    build(tiny_data_dir, name="rotatedmnist", num_tasks=3, per_task_rotation=30, rotation_jitter="task", seed=1)
    assert seen != first


def test_rotation_jitter_bad_value_is_a_config_error():
    from cl_runner.errors import ConfigError

    with pytest.raises(ConfigError, match="rotation_jitter.*false, sample"):
        mnist.rotation_jitter_mode("sometimes")


# -- permutations -------------------------------------------------------------------------------

def recover_permutation(original: np.ndarray, permuted: np.ndarray) -> np.ndarray:
    """The pixel permutation p with permuted[:, k] == original[:, p[k]] (columns are unique)."""
    o = original.reshape(len(original), -1)
    q = permuted.reshape(len(permuted), -1)
    where = {o[:, j].tobytes(): j for j in range(o.shape[1])}
    assert len(where) == o.shape[1], "pixel columns are not unique; cannot recover the permutation"
    return np.array([where[q[:, k].tobytes()] for k in range(q.shape[1])])


def test_permutations(tiny_data_dir, mnist_ds):
    s = build(tiny_data_dir, name="permutedmnist", num_tasks=3, seed=5)
    perms = [recover_permutation(mnist_ds.train_x, t.train_x) for t in s.tasks]
    for t, p in zip(s.tasks, perms):
        assert sorted(p.tolist()) == list(range(784))
        # The same permutation is applied to the test split.
        np.testing.assert_array_equal(t.test_x, permute_pixels(mnist_ds.test_x, p))
        np.testing.assert_array_equal(t.test_y, mnist_ds.test_y)
        assert t.info == {"permuted": True}
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[1], perms[2])
    assert (perms[0] != np.arange(784)).mean() > 0.9
    # Fixed for a seed: built again (in another order of tasks: more tasks) it is the same.
    s2 = build(tiny_data_dir, name="permutedmnist", num_tasks=4, seed=5)
    for a, b in zip(s.tasks, s2.tasks[:3]):
        np.testing.assert_array_equal(a.train_x, b.train_x)
    # Another seed draws other permutations.
    s3 = build(tiny_data_dir, name="permutedmnist", num_tasks=1, seed=6)
    assert not np.array_equal(recover_permutation(mnist_ds.train_x, s3.tasks[0].train_x), perms[0])


def test_first_task_unpermuted(tiny_data_dir, mnist_ds):
    s = build(tiny_data_dir, name="permutedmnist", num_tasks=3, first_task_unpermuted=True)
    np.testing.assert_array_equal(s.tasks[0].train_x, mnist_ds.train_x)
    np.testing.assert_array_equal(s.tasks[0].test_x, mnist_ds.test_x)
    assert s.tasks[0].info == {"permuted": False}
    assert not np.array_equal(s.tasks[1].train_x, mnist_ds.train_x)
    # The later tasks keep the permutations they have without the option.
    s_all = build(tiny_data_dir, name="permutedmnist", num_tasks=3)
    np.testing.assert_array_equal(s.tasks[2].train_x, s_all.tasks[2].train_x)


# -- split --------------------------------------------------------------------------------------

def test_split_tasks_contain_exactly_their_classes(tiny_data_dir, mnist_ds):
    s = build(tiny_data_dir, name="splitmnist")
    assert s.num_tasks == 5 and s.scenario == "class_il" and s.num_outputs == 10
    for t in s.tasks:
        cls = [2 * t.id, 2 * t.id + 1]
        assert t.classes.tolist() == cls and t.info["classes"] == cls
        for x, y, src_x, src_y in ((t.train_x, t.train_y, mnist_ds.train_x, mnist_ds.train_y),
                                   (t.test_x, t.test_y, mnist_ds.test_x, mnist_ds.test_y)):
            keep = np.isin(src_y, cls)
            # Every sample of the task's classes, in the dataset's order, and nothing else.
            np.testing.assert_array_equal(y, src_y[keep])
            np.testing.assert_array_equal(x, src_x[keep])
            assert set(np.unique(y).tolist()) == set(cls)
    assert sum(t.num_train for t in s.tasks) == 600


def test_split_class_order_and_sizes(tiny_data_dir):
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    s = build(tiny_data_dir, name="splitmnist", classes_per_task=3, num_tasks=3, class_order=order)
    assert [t.classes.tolist() for t in s.tasks] == [[3, 1, 4], [0, 5, 9], [2, 6, 8]]
    assert set(np.unique(s.tasks[1].train_y).tolist()) == {0, 5, 9}
    a = build(tiny_data_dir, seed=1, name="splitmnist", class_order="seed")
    b = build(tiny_data_dir, seed=1, name="splitmnist", class_order="seed")
    c = build(tiny_data_dir, seed=2, name="splitmnist", class_order="seed")
    flat = lambda s: [k for t in s.tasks for k in t.classes.tolist()]  # noqa: E731
    assert flat(a) == flat(b) and sorted(flat(a)) == list(range(10))
    assert flat(a) != flat(c)
    with pytest.raises(ConfigError, match="needs 12 classes"):
        build(tiny_data_dir, name="splitmnist", classes_per_task=3, num_tasks=4)
    with pytest.raises(ConfigError, match="class_order must list each"):
        build(tiny_data_dir, name="splitmnist", class_order=[0, 1, 2])


# -- label spaces of the scenarios (as documented in cl_runner/benchmarks/mnist.py) -------------

def test_split_scenarios(tiny_data_dir, mnist_ds):
    for scenario in ("class_il", "task_il"):
        s = build(tiny_data_dir, name="splitmnist", scenario=scenario)
        assert s.num_outputs == 10 and s.masks_logits == (scenario == "task_il")
        for t in s.tasks:
            assert set(t.train_y.tolist()) <= set(t.classes.tolist())
    s = build(tiny_data_dir, name="splitmnist", scenario="domain_il")
    assert s.num_outputs == 2 and not s.masks_logits
    for t in s.tasks:
        assert t.classes.tolist() == [0, 1]
        orig = mnist_ds.train_y[np.isin(mnist_ds.train_y, [2 * t.id, 2 * t.id + 1])]
        np.testing.assert_array_equal(t.train_y, orig - 2 * t.id)  # position inside the task


@pytest.mark.parametrize("name", ["permutedmnist", "rotatedmnist"])
def test_input_domain_scenarios(tiny_data_dir, mnist_ds, name):
    s = build(tiny_data_dir, name=name, num_tasks=3)
    assert s.scenario == "domain_il" and s.num_outputs == 10
    for t in s.tasks:
        assert t.classes.tolist() == list(range(10))
        np.testing.assert_array_equal(t.train_y, mnist_ds.train_y)
    for scenario in ("task_il", "class_il"):
        s = build(tiny_data_dir, name=name, num_tasks=3, scenario=scenario)
        assert s.num_outputs == 30 and s.masks_logits == (scenario == "task_il")
        for t in s.tasks:
            assert t.classes.tolist() == list(range(10 * t.id, 10 * t.id + 10))
            np.testing.assert_array_equal(t.train_y, mnist_ds.train_y + 10 * t.id)
            np.testing.assert_array_equal(t.test_y, mnist_ds.test_y + 10 * t.id)


def test_fashion_mnist_streams(tiny_data_dir):
    fds = load_image_dataset("fashion-mnist", tiny_data_dir, download=False)
    s = build(tiny_data_dir, name="rotatedfmnist", num_tasks=2)
    np.testing.assert_array_equal(s.tasks[0].train_x, fds.train_x)
    assert s.mean == (0.2860,) and s.std == (0.3530,)
    assert build(tiny_data_dir, name="splitfmnist").num_tasks == 5
    assert build(tiny_data_dir, name="permutedfmnist", num_tasks=2).num_outputs == 10


# -- subsets ------------------------------------------------------------------------------------

def test_subsets(tiny_data_dir, mnist_ds):
    s = build(tiny_data_dir, name="rotatedmnist", num_tasks=3, subset=50, test_subset=30, seed=3)
    for t in s.tasks:
        assert t.num_train == 50 and t.num_test == 30
    # Each task draws its own samples (unrotated task 0: they are rows of the dataset, in order).
    rows = {r.tobytes(): i for i, r in enumerate(mnist_ds.train_x.reshape(600, -1))}
    idx = [rows[r.tobytes()] for r in s.tasks[0].train_x.reshape(50, -1)]
    assert idx == sorted(idx) and len(set(idx)) == 50
    np.testing.assert_array_equal(s.tasks[0].train_y, mnist_ds.train_y[idx])
    assert not np.array_equal(s.tasks[0].train_y, s.tasks[1].train_y)  # another draw
    # Larger than the split: everything, in order.
    s = build(tiny_data_dir, name="rotatedmnist", num_tasks=1, subset=10_000)
    np.testing.assert_array_equal(s.tasks[0].train_y, mnist_ds.train_y)
    # Split benchmarks subsample inside the task's classes.
    s = build(tiny_data_dir, name="splitmnist", subset=20, test_subset=7)
    for t in s.tasks:
        assert t.num_train == 20 and t.num_test == 7
        assert set(t.train_y.tolist()) <= set(t.classes.tolist())


def test_pad_to(tiny_data_dir, mnist_ds):
    s = build(tiny_data_dir, name="rotatedmnist", num_tasks=1, pad_to=32)
    assert s.input_shape == (1, 32, 32) and s.tasks[0].test_x.shape == (200, 1, 32, 32)
    np.testing.assert_array_equal(s.tasks[0].test_x[:, :, 2:30, 2:30], mnist_ds.test_x)
    assert s.tasks[0].test_x[:, :, :2].sum() == 0 and s.tasks[0].test_x[:, :, :, 30:].sum() == 0
    with pytest.raises(ValueError):
        pad(mnist_ds.test_x, 20)


# -- seeding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(name="permutedmnist", num_tasks=2, subset=100),
    dict(name="rotatedmnist", num_tasks=2, subset=100, rotation_jitter=True),
    dict(name="splitmnist", subset=40, class_order="seed"),
])
def test_streams_are_deterministic_per_seed(tiny_data_dir, kw):
    a, b = build(tiny_data_dir, seed=11, **kw), build(tiny_data_dir, seed=11, **kw)
    c = build(tiny_data_dir, seed=12, **kw)
    for ta, tb in zip(a.tasks, b.tasks):
        for part in ("train_x", "train_y", "test_x", "test_y", "classes"):
            np.testing.assert_array_equal(getattr(ta, part), getattr(tb, part))
    assert any(not np.array_equal(ta.train_x, tc.train_x) for ta, tc in zip(a.tasks, c.tasks))


# -- the disk cache -----------------------------------------------------------------------------

def test_cache_returns_equal_arrays_without_reading_data(tiny_data_dir, tmp_path, monkeypatch):
    kw = dict(name="permutedmnist", num_tasks=2, subset=80, cache=True, scenario="task_il")
    first = build(tiny_data_dir, seed=4, cache_dir=tmp_path, **kw)
    entries = list((tmp_path / "streams").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()

    def no_data(*a, **k):
        raise AssertionError("the second build must come from the cache")

    monkeypatch.setattr(builder, "load_image_dataset", no_data)
    second = build(tiny_data_dir, seed=4, cache_dir=tmp_path, **kw)
    assert (second.name, second.scenario, second.num_outputs, second.input_shape, second.mean, second.std) == \
        (first.name, first.scenario, first.num_outputs, first.input_shape, first.mean, first.std)
    for a, b in zip(first.tasks, second.tasks):
        assert a.id == b.id and a.info == b.info
        for part in ("train_x", "train_y", "test_x", "test_y", "classes"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
            assert getattr(a, part).dtype == getattr(b, part).dtype


@pytest.mark.parametrize("kw, damaged", [
    (dict(name="rotatedmnist"), "task1_test_x_index.npy"),  # a task's pixel index
    (dict(name="rotatedmnist"), "base_test.npy"),  # the source split the tasks are gathered from
    (dict(name="rotatedmnist", rotation_jitter=True), "task1_test_x.npy"),  # stored pixels
])
def test_damaged_cache_entry_is_rebuilt(tiny_data_dir, tmp_path, kw, damaged):
    kw = dict(num_tasks=2, cache=True, **kw)
    first = build(tiny_data_dir, cache_dir=tmp_path, **kw)
    # A copy: stored pixels are read from the cache files (memory maps), and the file is about
    # to be overwritten in place.
    expected = np.array(first.tasks[1].test_x)
    assert isinstance(first.tasks[1].test_x, np.memmap) == (damaged == "task1_test_x.npy")
    entry = next((tmp_path / "streams").iterdir())
    del first
    (entry / damaged).write_bytes(b"garbage")
    again = build(tiny_data_dir, cache_dir=tmp_path, **kw)
    np.testing.assert_array_equal(again.tasks[1].test_x, expected)


def test_cache_off_writes_nothing(tiny_data_dir, tmp_path):
    build(tiny_data_dir, cache_dir=tmp_path, name="rotatedmnist", num_tasks=1, cache=False)
    assert not (tmp_path / "streams").exists()


def test_cache_key_changes_with_parameters():
    base = dict(name="rotatedmnist", num_tasks=3)
    k = cache_key(bcfg(**base), 0)
    for change in (dict(per_task_rotation=10), dict(num_tasks=4), dict(subset=100), dict(test_subset=10),
                   dict(rotation_jitter=True), dict(interpolation="bilinear"), dict(pad_to=32),
                   dict(scenario="task_il"), dict(name="rotatedfmnist")):
        assert cache_key(bcfg(**{**base, **change}), 0) != k, change
    # Parameters that do not change the stream do not change the key.
    for same in (dict(batch_size=64), dict(eval_batch_size=7), dict(normalize=False), dict(cache=True),
                 dict(first_task_unpermuted=True)):
        assert cache_key(bcfg(**{**base, **same}), 0) == k, same
    # Unseeded streams share an entry across seeds; seeded ones do not.
    assert cache_key(bcfg(**base), 1) == k
    assert cache_key(bcfg(**base, subset=100), 1) != cache_key(bcfg(**base, subset=100), 0)
    p = dict(name="permutedmnist", num_tasks=3)
    assert cache_key(bcfg(**p), 1) != cache_key(bcfg(**p), 0)
    assert cache_key(bcfg(**p, first_task_unpermuted=True), 0) != cache_key(bcfg(**p), 0)
    s = dict(name="splitmnist")
    assert cache_key(bcfg(**s, classes_per_task=1), 0) != cache_key(bcfg(**s), 0)
    assert cache_key(bcfg(**s, class_order=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]), 0) != cache_key(bcfg(**s), 0)


def test_cache_is_not_shared_between_different_data(tmp_path):
    # The same benchmark parameters over two different copies of the data are two streams.
    a, b = tmp_path / "a", tmp_path / "b"
    write_tiny_dataset(a, "mnist", n_train=40, n_test=20, seed=0)
    write_tiny_dataset(b, "mnist", n_train=40, n_test=20, seed=1)
    kw = dict(name="rotatedmnist", num_tasks=1, cache=True)
    sa = build_stream(bcfg(**kw), 0, a, tmp_path / "cache")
    sb = build_stream(bcfg(**kw), 0, b, tmp_path / "cache")
    np.testing.assert_array_equal(sb.tasks[0].train_x, load_image_dataset("mnist", b, download=False).train_x)
    assert not np.array_equal(sa.tasks[0].train_x, sb.tasks[0].train_x)
