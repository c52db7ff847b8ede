"""Run folders and checkpoints under faults and misuse: one writer per folder, no checkpoint
replaced silently, ``resume=auto`` and ``overwrite=true`` (docs/RELIABILITY.md)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import TINY, read_results, run_clrun
from cl_runner import checkpoint
from cl_runner.errors import CheckpointError, ClrunError, ConfigError
from cl_runner.experiment import run_experiment
from cl_runner.utils import lock

ARGS = ["benchmark=splitmnist", "benchmark.num_tasks=2", "algo=ewc", *TINY]


def quiet() -> Console:
    return Console(file=io.StringIO())


def tiny(data_dir, **extra) -> dict:
    cfg = {"data_dir": str(data_dir), "progress": False, "loggers": ["jsonl"], "algo": {"name": "ewc"},
           "benchmark": {"name": "splitmnist", "num_tasks": 2, "batch_size": 32, "eval_batch_size": 200},
           "backbone": {"width": 16}}
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


# -- 5. one writer per run folder -----------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_stops_before_writing_anything(tmp_path, tiny_data_dir):
    """A folder whose lock another process holds: clrun stops with exit 2 naming that process,
    before Hydra writes its .hydra/ files there."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from cl_runner.utils import lock; lock.acquire(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(120)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}"], tmp_path)
        assert res.returncode == 2, res.stderr
        assert "another clrun run" in res.stderr and f"pid {holder.pid}" in res.stderr
        assert "hydra.run.dir" in res.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [lock.LOCK_NAME]  # nothing else written
        # The same through the Python API.
        with pytest.raises(ClrunError, match="another clrun run"):
            run_experiment(tiny(tiny_data_dir), run_dir, console=quiet())
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    """The kernel drops the lock with its process, even on SIGKILL: no stale lock to clean up."""
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from cl_runner.utils import lock; lock.acquire(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(120)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ClrunError):
        lock.acquire(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock.acquire(tmp_path)
    assert lock.held(tmp_path)
    lock.release(tmp_path)
    assert not lock.held(tmp_path)


def test_the_lock_is_counted_within_a_process(tmp_path):
    """The command line takes the lock before Hydra starts and the run takes it again: the second
    take must not block, and the lock lasts until the last release."""
    lock.acquire(tmp_path)
    lock.acquire(tmp_path)
    lock.release(tmp_path)
    assert lock.held(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import sys; from cl_runner.utils import lock; "
                            "lock.acquire(sys.argv[1])", str(tmp_path)], capture_output=True, text=True)
    assert probe.returncode != 0 and "another clrun run" in probe.stderr
    lock.release(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import sys; from cl_runner.utils import lock; "
                            "lock.acquire(sys.argv[1])", str(tmp_path)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


def test_sweep_jobs_and_seeds_each_lock_their_own_folder(tmp_path, tiny_data_dir):
    """A sweep's jobs and a seeds=[...] run's seeds write to folders of their own: the lock lets
    every one of them run."""
    res = run_clrun(["-m", *ARGS, f"data_dir={tiny_data_dir}", "algo=naive,ewc", "seed=0,1",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "sweep").glob("*/results.json"))) == 4
    agg = run_experiment(tiny(tiny_data_dir, seeds=[0, 1]), tmp_path / "seeds", console=quiet())
    assert agg["seeds"] == [0, 1]
    assert not lock.held(tmp_path / "seeds") and not lock.held(tmp_path / "seeds" / "seed=0")


# -- 6. an existing checkpoint is never overwritten silently --------------------------------------
def test_a_run_into_a_folder_with_a_checkpoint_stops_and_says_what_to_do(tmp_path, tiny_data_dir):
    run_dir = tmp_path / "run"
    first = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr
    before = (run_dir / checkpoint.FILENAME).read_bytes()
    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()
    again = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}", "optimizer.lr=0.5"],
                      tmp_path)
    assert again.returncode == 2
    message = " ".join(again.stderr.split())
    assert "already holds the checkpoint" in message
    assert "resume=true" in message and "overwrite=true" in message and "resume=auto" in message
    assert (run_dir / checkpoint.FILENAME).read_bytes() == before
    assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config  # refused before Hydra wrote
    # The Python API refuses it too, before loading any data.
    with pytest.raises(CheckpointError, match="already holds the checkpoint"):
        run_experiment(tiny(tmp_path / "no-data-here"), run_dir, console=quiet())


def test_resume_auto_starts_then_continues(tmp_path, tiny_data_dir):
    """resume=auto: start when the folder has no checkpoint; continue when it has one. A run
    stopped before task 2 and continued with the same command ends like an uninterrupted run."""
    from cl_runner.core.callbacks import Callback

    class StopBeforeTask(Callback):
        def on_before_task(self, loop, task):
            if task.id == 1:
                raise KeyboardInterrupt

    full = run_experiment(tiny(tiny_data_dir, resume="auto"), tmp_path / "full", console=quiet())
    assert full["resumed"] is False
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny(tiny_data_dir, resume="auto"), tmp_path / "cut", console=quiet(),
                       callbacks=[StopBeforeTask()])
    assert checkpoint.load(tmp_path / "cut" / checkpoint.FILENAME)["loop"]["completed_tasks"] == 1
    resumed = run_experiment(tiny(tiny_data_dir, resume="auto"), tmp_path / "cut", console=quiet())
    assert resumed["resumed"] is True
    assert resumed["acc_matrix"].tolist() == full["acc_matrix"].tolist()
    assert resumed["avg_acc"] == full["avg_acc"]


def test_resume_auto_on_the_command_line(tmp_path, tiny_data_dir):
    run_dir = tmp_path / "run"
    common = [*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}", "resume=auto"]
    first = run_clrun(common, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "resuming" not in first.stderr and read_results(run_dir)["resumed"] is False
    second = run_clrun(common, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming after task 2 of 2" in second.stderr and read_results(run_dir)["resumed"] is True


def test_overwrite_starts_again_and_clears_the_old_run(tmp_path, tiny_data_dir):
    first = run_experiment(tiny(tiny_data_dir), tmp_path, console=quiet())
    events = (tmp_path / "events.jsonl").read_text().splitlines()
    second = run_experiment(tiny(tiny_data_dir, overwrite=True, optimizer={"lr": 0.05}), tmp_path,
                            console=quiet())
    assert second["resumed"] is False
    assert checkpoint.load(tmp_path / checkpoint.FILENAME)["config"]["optimizer"]["lr"] == 0.05
    assert second["avg_acc"] != first["avg_acc"]
    # The event log is the new run's alone, not appended to the old one.
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == len(events)


def test_resume_from_another_run_into_a_folder_with_its_own_checkpoint(tmp_path, tiny_data_dir):
    run_experiment(tiny(tiny_data_dir), tmp_path / "a", console=quiet())
    run_experiment(tiny(tiny_data_dir, seed=1), tmp_path / "b", console=quiet())
    with pytest.raises(CheckpointError, match="checkpoint of another run"):
        run_experiment(tiny(tiny_data_dir, resume=str(tmp_path / "a")), tmp_path / "b", console=quiet())
    res = run_experiment(tiny(tiny_data_dir, resume=str(tmp_path / "a"), overwrite=True), tmp_path / "b",
                         console=quiet())
    assert res["resumed"] is True


@pytest.mark.parametrize("extra, words", [
    ({"resume": True, "overwrite": True}, "choose one"),
    ({"resume": "auto", "overwrite": True}, "choose one"),
    ({"resume": 3}, "is not one of true, false, auto"),
    ({"seeds": [0, 1], "resume": True}, "resume cannot be combined"),
])
def test_contradictory_resume_settings_are_config_errors(tiny_data_dir, tmp_path, extra, words):
    from cl_runner.config import validate_config

    with pytest.raises(ConfigError, match=words):
        validate_config(tiny(tiny_data_dir, **extra))


def test_seeds_with_resume_auto_continue_each_seed(tmp_path, tiny_data_dir):
    """seeds=[...] with resume=auto: every seed folder with a checkpoint continues, the others
    start; without resume or overwrite the run stops before any seed trains."""
    import shutil

    cfg = tiny(tiny_data_dir, seeds=[0, 1])
    first = run_experiment(cfg, tmp_path, console=quiet())
    with pytest.raises(CheckpointError, match="seed=0"):
        run_experiment(cfg, tmp_path, console=quiet())
    shutil.rmtree(tmp_path / "seed=1")
    again = run_experiment({**cfg, "resume": "auto"}, tmp_path, console=quiet())
    assert again["metrics"]["avg_acc"]["values"] == first["metrics"]["avg_acc"]["values"]
    assert read_results(tmp_path / "seed=0")["resumed"] is True
    assert read_results(tmp_path / "seed=1")["resumed"] is False


def test_jax_seeds_with_resume_auto_run_one_after_another(tmp_path, tiny_data_dir):
    pytest.importorskip("jax")
    cfg = tiny(tiny_data_dir, seeds=[0, 1], backend={"name": "jax"}, loggers=[])
    first = run_experiment(cfg, tmp_path, console=quiet())
    assert first["vectorized"] is True
    again = run_experiment({**cfg, "resume": "auto"}, tmp_path, console=quiet())
    assert again["vectorized"] is False
    assert again["metrics"]["avg_acc"]["values"] == first["metrics"]["avg_acc"]["values"]


# -- 1, 3. checkpoints hold data only, checksummed ------------------------------------------------
class _CreatesAFile:
    """Unpickling this object opens (creates) a file: what any code in a pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["checkpoint.pt", checkpoint.FILENAME])
def test_a_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny_data_dir, name):
    import pickle

    import torch

    marker = tmp_path / "created-by-the-pickle"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    payload = {"format": 1, "config": {}, "learner": _CreatesAFile(marker), "loop": {}, "rng": {}}
    torch.save(payload, run_dir / name)
    # The file is a working exploit: unpickling it the way clrun format 1 did creates the marker.
    probe = tmp_path / "probe"
    torch.save({"x": _CreatesAFile(probe)}, tmp_path / "probe.pt")
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(tmp_path / "probe.pt")], cwd=tmp_path, capture_output=True)
    assert probe.exists(), "the test's pickle should create a file when unpickled"

    for resume in ("resume=true", "resume=auto"):
        res = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}", resume], tmp_path)
        assert res.returncode == 2, res.stderr
        assert "pickle" in res.stderr and "Traceback" not in res.stderr
        assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(run_dir / checkpoint.FILENAME)
    (run_dir / name).write_bytes(pickle.dumps(payload))  # a bare pickle, not torch's zip
    with pytest.raises(CheckpointError):
        checkpoint.load(run_dir / name)
    assert not marker.exists()


def test_an_old_format_checkpoint_counts_as_a_checkpoint_and_overwrite_replaces_it(tmp_path, tiny_data_dir):
    import torch

    torch.save({"format": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="already holds the checkpoint"):
        run_experiment(tiny(tiny_data_dir), tmp_path, console=quiet())
    with pytest.raises(CheckpointError, match="format 1"):
        run_experiment(tiny(tiny_data_dir, resume=True), tmp_path, console=quiet())
    run_experiment(tiny(tiny_data_dir, overwrite=True), tmp_path, console=quiet())
    assert not (tmp_path / "checkpoint.pt").exists() and (tmp_path / checkpoint.FILENAME).is_file()


def _finished_run(tmp_path, tiny_data_dir):
    run_experiment(tiny(tiny_data_dir), tmp_path, console=quiet())
    return tmp_path / checkpoint.FILENAME


@pytest.mark.parametrize("damage", ["16 low bits", "64 bytes", "truncated", "appended"])
def test_a_damaged_checkpoint_fails_its_checksum(tmp_path, tiny_data_dir, damage):
    """Flipping a few low bits of the weights used to give silently different accuracies, and
    64 damaged bytes a NaN blamed on the learning rate: the checksum names the damage instead."""
    path = _finished_run(tmp_path, tiny_data_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if damage == "16 low bits":
        for i in range(16):
            data[middle + 4 * i] ^= 1
    elif damage == "64 bytes":
        data[middle:middle + 64] = os.urandom(64)
    elif damage == "truncated":
        data = data[:middle]
    else:
        data += b"\0" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        checkpoint.load(path)
    assert "checksum" in str(info.value)
    with pytest.raises(CheckpointError, match="checksum"):
        run_experiment(tiny(tiny_data_dir, resume=True), tmp_path, console=quiet())


@pytest.mark.parametrize("drop", ["rng", "learner", "loop.acc_matrix", "rng.numpy"])
def test_a_checkpoint_with_missing_keys_is_a_clean_error(tmp_path, tiny_data_dir, drop):
    from cl_runner.utils import arrayfile

    path = _finished_run(tmp_path, tiny_data_dir)
    tree, meta = arrayfile.loads(path.read_bytes())
    section, _, key = drop.partition(".")
    if key:
        del tree[section][key]
    else:
        del tree[section]
    path.write_bytes(arrayfile.dumps(tree, meta))  # a valid checksum over an incomplete checkpoint
    with pytest.raises(CheckpointError, match=f"incomplete: it lacks {drop}"):
        checkpoint.load(path)
    res = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={tmp_path}", "resume=true"], tmp_path)
    assert res.returncode == 2 and "incomplete" in res.stderr and "Traceback" not in res.stderr


def test_a_checkpoint_of_another_format_number_is_refused(tmp_path, tiny_data_dir):
    from cl_runner.utils import arrayfile

    path = _finished_run(tmp_path, tiny_data_dir)
    tree, meta = arrayfile.loads(path.read_bytes())
    path.write_bytes(arrayfile.dumps(tree, {**meta, "format": 99}))
    with pytest.raises(CheckpointError, match="format 99.*reads format 2"):
        checkpoint.load(path)


def test_the_array_file_keeps_every_type_a_state_holds_and_refuses_objects():
    import random

    import ml_dtypes
    import torch

    from cl_runner.utils import arrayfile

    tree = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "fortran": np.asfortranarray(np.eye(3)),
        "strided": np.arange(10)[::3], "bf16": np.ones(3, dtype=ml_dtypes.bfloat16), "zero_d": np.array(2.5),
        "np_scalar": np.float32(1.5), "np_int": np.int64(-7), "np_bool": np.bool_(True),
        "t_bf16": torch.randn(3, 2).to(torch.bfloat16), "t_bool": torch.tensor([True, False]),
        "t_empty": torch.empty(0, 3), "t_scalar": torch.tensor(3), "generator": torch.Generator().get_state(),
        0: {"momentum_buffer": torch.zeros(4), "step": torch.tensor(3.0)}, (1, "a"): None,
        "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
        "floats": [float("nan"), float("inf"), -0.0, 1e-300], "nested": [[1, 2], [], ("x", b"\x00\xff")],
    }
    back, meta = arrayfile.loads(arrayfile.dumps(tree, {"format": 2}))
    assert meta == {"format": 2} and set(back) == set(tree)
    for k, v in tree.items():
        w = back[k]
        assert type(w) is type(v), k
        if isinstance(v, torch.Tensor):
            assert w.dtype == v.dtype and torch.equal(w, v), k
        elif isinstance(v, (np.ndarray, np.generic)):
            assert w.dtype == v.dtype and w.shape == np.shape(v) and np.array_equal(w, v), k
    assert back["python_rng"] == tree["python_rng"]
    assert back["numpy_rng"][0] == "MT19937" and np.array_equal(back["numpy_rng"][1], tree["numpy_rng"][1])
    assert np.isnan(back["floats"][0]) and back["floats"][1:] == [float("inf"), -0.0, 1e-300]
    assert back["nested"] == [[1, 2], [], ("x", b"\x00\xff")]
    assert back[0]["step"].item() == 3.0
    random.setstate(back["python_rng"])
    np.random.set_state(back["numpy_rng"])
    torch.Generator().set_state(back["generator"])
    for bad in (object(), {"a": [np.array([None], dtype=object)]}, {"p": Path("x")}):
        with pytest.raises(TypeError, match="cannot be stored"):
            arrayfile.dumps(bad)


def test_array_bounds_in_a_forged_header_are_checked():
    """A file whose checksum is right but whose table points outside it (a forged file): a
    clean error, not a read past the end."""
    import hashlib
    import struct

    from cl_runner.utils import arrayfile

    header = json.dumps({"meta": {}, "tree": {"a": 0}, "arrays": [
        {"kind": "numpy", "dtype": "<f4", "shape": [1000], "offset": 0, "nbytes": 4000}]}).encode()
    body = header + b"\0" * 16
    data = arrayfile.MAGIC + struct.pack("<Q", len(header)) + hashlib.sha256(body).digest() + body
    with pytest.raises(arrayfile.ArrayFileError, match="bounds"):
        arrayfile.loads(data)
    header = json.dumps({"meta": {}, "tree": {"a": 0}, "arrays": [
        {"kind": "numpy", "dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8}]}).encode()
    body = header + b"\0" * 16
    data = arrayfile.MAGIC + struct.pack("<Q", len(header)) + hashlib.sha256(body).digest() + body
    with pytest.raises(arrayfile.ArrayFileError, match="objects"):
        arrayfile.loads(data)


TORCH_ALGOS = ["agem", "der", "derpp", "er", "ewc", "ewc_online", "gdumb", "gem", "icarl", "joint", "kcl",
               "lamaml", "lfl", "lwf", "mas", "mcsgd", "naive", "naive_rehearsal", "pnn", "si", "stable_sgd"]
# One of each kind of JAX state (regulariser sums, replay memory, exemplars, GDumb's memory,
# KCL's coresets, MC-SGD's, La-MAML's learnt rates), each compile taking seconds.
JAX_ALGOS = ["ewc", "er", "icarl", "gdumb", "kcl", "mcsgd", "lamaml"]
SMALL = {"gdumb": {"epochs": 2}, "kcl": {"coreset_size": 8}}


@pytest.mark.parametrize("backend,name", [("torch", n) for n in TORCH_ALGOS] + [("jax", n) for n in JAX_ALGOS])
def test_every_algorithms_state_goes_through_a_checkpoint_unchanged(tmp_path, backend, name):
    """The learner's whole state (model, optimizer, the algorithm's parts, RNGs) after two tasks
    survives a checkpoint written and read back: restored into a new learner, its state is the
    same array for array."""
    if backend == "jax":
        pytest.importorskip("jax")
    from cl_runner import catalog
    from cl_runner.config import validate_config
    from cl_runner.core.loop import ContinualLoop
    from cl_runner.registry import ALGORITHMS
    from cl_runner.utils import arrayfile

    from test_jax_backend import tiny_stream

    catalog.load()
    be = catalog.load_backend(backend)
    scenario = (ALGORITHMS.meta(name).get("scenarios") or ["class_il"])[0]
    typed, _ = validate_config({"algo": {"name": name, **SMALL.get(name, {})}, "backend": {"name": backend},
                                "backbone": {"width": 8, "n_hidden_layers": 1},
                                "benchmark": {"batch_size": 8, "scenario": scenario}})
    stream = tiny_stream(2, scenario)
    learner = be.build_learner(typed, stream, be.resolve_device("cpu"), 0)
    loop = ContinualLoop(learner, stream, [])
    loop.run()
    checkpoint.save(tmp_path / checkpoint.FILENAME, learner, loop.state, {"seed": 0})
    payload = checkpoint.load(tmp_path / checkpoint.FILENAME)
    other = be.build_learner(typed, stream, be.resolve_device("cpu"), 1)
    from cl_runner.core.loop import LoopState

    checkpoint.restore(payload, other, LoopState(2), {"seed": 0}, tmp_path)

    def leaves(tree, prefix=""):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from leaves(v, f"{prefix}{k}.")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                yield from leaves(v, f"{prefix}{i}.")
        else:
            yield prefix, tree

    import torch

    def plain(v):
        if isinstance(v, torch.Tensor):
            return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        return v

    # Compare as the checkpoint stores them: both states through the same encoder.
    a = dict(leaves(arrayfile.loads(arrayfile.dumps(learner.state_dict()))[0]))
    b = dict(leaves(arrayfile.loads(arrayfile.dumps(other.state_dict()))[0]))
    assert a.keys() == b.keys()
    for k in a:
        x, y = plain(a[k]), plain(b[k])
        if isinstance(x, (np.ndarray, np.generic)):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True), k
        else:
            assert x == y or (x != x and y != y), k


# -- 4. the stream cache validates what it loads --------------------------------------------------
def _bcfg(**kw):
    from cl_runner.config import validate_config

    return validate_config({"benchmark": {"num_tasks": 2, "cache": True, **kw}})[0].benchmark


def _build(data_dir, cache_dir, **kw):
    from cl_runner.benchmarks import build_stream

    return build_stream(_bcfg(**kw), 0, data_dir, cache_dir)


def _same_stream(a, b):
    assert a.num_outputs == b.num_outputs and a.input_shape == b.input_shape
    for x, y in zip(a.tasks, b.tasks):
        for part in ("train_x", "train_y", "test_x", "test_y", "classes"):
            np.testing.assert_array_equal(np.asarray(getattr(x, part)), np.asarray(getattr(y, part)))


def _rewrite(entry, name, array):
    """Replace a cache file by ``array`` and record its new size and checksum in meta.json, as a
    faulty writer would have: only the range checks can catch what it holds."""
    import hashlib

    np.save(entry / name, array)
    meta = json.loads((entry / "meta.json").read_text())
    data = (entry / name).read_bytes()
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("kw", [dict(name="rotatedmnist"), dict(name="rotatedmnist", rotation_jitter=True)],
                         ids=["planned", "stored"])
@pytest.mark.parametrize("damage", ["null meta", "empty list meta", "zero-byte npy", "flipped byte",
                                    "labels out of range", "index out of range", "rows out of range",
                                    "missing file"])
def test_a_damaged_cache_entry_is_deleted_and_rebuilt_with_one_line(tiny_data_dir, tmp_path, capfd, kw, damage):
    """Each of these was a TypeError, EOFError or IndexError (at training time), and the bad entry
    stayed: now the entry is checked on load, and a damaged one is rebuilt, saying so once."""
    fresh = _build(tiny_data_dir, None, **{**kw, "cache": False})
    _build(tiny_data_dir, tmp_path, **kw)
    (entry,) = (tmp_path / "streams").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    planned = bool(meta["bases"])
    if damage in ("index out of range", "rows out of range") and not planned:
        pytest.skip("only a planned entry has pixel indices")
    labels = "task1_train_y.npy"
    if damage == "null meta":
        (entry / "meta.json").write_text("null")
    elif damage == "empty list meta":
        (entry / "meta.json").write_text("[]")
    elif damage == "zero-byte npy":
        (entry / labels).write_bytes(b"")
    elif damage == "flipped byte":
        name = "base_train.npy" if planned else "task1_train_x.npy"
        data = bytearray((entry / name).read_bytes())
        data[len(data) // 2] ^= 0x10
        (entry / name).write_bytes(bytes(data))
    elif damage == "labels out of range":
        y = np.load(entry / labels)
        y[3] = 10
        _rewrite(entry, labels, y)
    elif damage == "index out of range":
        index = np.load(entry / "task1_train_x_index.npy")
        index[5] = 28 * 28
        _rewrite(entry, "task1_train_x_index.npy", index)
    elif damage == "rows out of range":
        if not (entry / "task1_train_x_rows.npy").exists():
            _rewrite(entry, "task1_train_x_rows.npy", np.arange(5, dtype=np.int64) + 10**6)
            meta = json.loads((entry / "meta.json").read_text())
            meta["tasks"][1]["gathered"]["train_x"]["rows"] = True
            (entry / "meta.json").write_text(json.dumps(meta))
    else:
        (entry / labels).unlink()
    capfd.readouterr()
    again = _build(tiny_data_dir, tmp_path, **kw)
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if "is damaged" in line]) == 1, err
    assert "deleted and built again" in err
    _same_stream(again, fresh)
    # The rebuilt entry is whole: the next build loads it without a word.
    third = _build(tiny_data_dir, tmp_path, **kw)
    assert "damaged" not in capfd.readouterr().err
    _same_stream(third, fresh)


def test_cache_files_are_flushed_before_the_entry_is_renamed_into_place(tiny_data_dir, tmp_path, monkeypatch):
    from cl_runner.benchmarks import builder

    synced, events = set(), []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", set(synced), str(src)))
        return real_rename(src, dst)

    monkeypatch.setattr(builder.os, "fsync", fsync)
    monkeypatch.setattr(builder.os, "rename", rename)
    _build(tiny_data_dir, tmp_path, name="rotatedmnist")
    (entry,) = (tmp_path / "streams").iterdir()
    ((_, before, tmp),) = events
    names = {os.path.basename(p) for p in before if p.startswith(os.path.realpath(tmp))}
    assert names >= {p.name for p in entry.iterdir()}  # every file, meta.json included
    assert os.path.realpath(tmp) in before  # and the folder itself


def test_stale_temporary_folders_of_killed_writers_are_removed(tiny_data_dir, tmp_path):
    """A writer killed mid-write leaves a .tmp- folder; the next write removes it, but never the
    folder of a writer still at work (it holds a lock in it)."""
    streams = tmp_path / "streams"
    dead, alive = streams / ".tmp-dead", streams / ".tmp-alive"
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / ".writer.lock").touch()
        (d / "task0_train_x.npy").write_bytes(b"half")
    old = streams / ".tmp-old-clrun"  # an older clrun's folder, without a lock file
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    writer = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(alive / ".writer.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        _build(tiny_data_dir, tmp_path, name="rotatedmnist")
        assert not dead.exists() and not old.exists()
        assert alive.exists()
    finally:
        writer.kill()
        writer.wait()


# -- 2. what a config file may execute ------------------------------------------------------------
EVIL = """# @package _global_
hydra:
  callbacks:
    evil:
      _target_: builtins.open
      file: {marker}
      mode: w
"""


@pytest.mark.parametrize("group", ["expected", "sweep"])
def test_hydra_callbacks_from_an_experiment_or_sweep_file_are_refused(tmp_path, tiny_data_dir, group):
    """A file loaded with +expected= / +sweep= that sets hydra.callbacks (which Hydra instantiates:
    here, a call that creates a file) is refused unless --allow-config-code is given."""
    marker = tmp_path / "created-by-the-callback"
    conf = tmp_path / "conf"
    (conf / group).mkdir(parents=True)
    body = EVIL.format(marker=marker)
    if group == "sweep":
        body += "  sweeper:\n    params:\n      seed: 0\n"
    (conf / group / "evil.yaml").write_text(body)
    args = ["--config-dir", str(conf), f"+{group}=evil", *ARGS, f"data_dir={tiny_data_dir}", "checkpoint=false",
            f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if group == "sweep":
        args = ["-m", *args]
    refused = run_clrun(args, tmp_path)
    assert refused.returncode == 2, refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"+{group}=evil sets hydra.callbacks" in message and "--allow-config-code" in message
    assert "a config file is code" in message.lower()
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    allowed = run_clrun(["--allow-config-code", *args], tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert marker.exists()  # the file really was code: with the flag, Hydra ran it


def test_callbacks_typed_on_the_command_line_are_the_users_own(tmp_path, tiny_data_dir):
    marker = tmp_path / "mine"
    res = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={tmp_path / 'run'}",
                     "+hydra.callbacks.mine._target_=builtins.open", f"+hydra.callbacks.mine.file={marker}",
                     "+hydra.callbacks.mine.mode=w"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert marker.exists()


# -- 7. printed recovery commands parse and work --------------------------------------------------
def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.communicate()}")
        time.sleep(0.05)
    assert path.exists()


def _wait_for_glob(folder, pattern, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not list(folder.glob(pattern)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared: {proc.communicate()}")
        time.sleep(0.05)
    assert list(folder.glob(pattern))


def _printed_command(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("continue with: ")]
    assert len(lines) == 1, stderr
    command = lines[0].removeprefix("continue with: ")
    assert command.startswith("clrun ")
    return command


def _run_printed(command: str, cwd) -> subprocess.CompletedProcess:
    """Run a printed ``clrun ...`` line through a shell, as a user pasting it would."""
    line = f"{sys.executable} -m cl_runner.cli {command.removeprefix('clrun ')}"
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


SLOW_ARGS = ["benchmark=rotatedmnist", "benchmark.num_tasks=4", "algo=ewc", "loggers=[jsonl,csv]",
             "benchmark.batch_size=4", "benchmark.eval_batch_size=200", "backbone.width=32", "progress=false"]


def test_the_command_printed_after_sigterm_continues_a_run_in_a_folder_hydra_must_quote(tmp_path, tiny_data_dir):
    """A folder named like a sweep job (``algo=naive,seed=0``) needs quoting for Hydra; the printed
    command quotes it, runs as printed, and finishes the run as an uninterrupted one would. The
    run stopped by SIGTERM exits 143 and records the interruption in cli.log."""
    run_dir = tmp_path / "algo=naive,seed=0"
    common = [*SLOW_ARGS, f"data_dir={tiny_data_dir}"]
    reference = run_clrun([*common, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen([sys.executable, "-m", "cl_runner.cli", *common, f"hydra.run.dir='{run_dir}'"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    _wait_for(run_dir / checkpoint.FILENAME, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived (a very fast machine)")
    assert proc.returncode == 143, err
    command = _printed_command(err)
    assert f"\"hydra.run.dir='{run_dir}'\"" in command and command.endswith("resume=true")
    assert "continue with: " + command in (run_dir / "cli.log").read_text()
    done = _run_printed(command, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resuming after task" in done.stderr
    a, b = read_results(tmp_path / "reference"), read_results(run_dir)
    assert b["resumed"] is True and a["acc_matrix"] == b["acc_matrix"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["completed_tasks"] >= 1 and resume["from"] == str(run_dir / checkpoint.FILENAME)


def test_the_command_printed_after_an_interrupted_sweep_finishes_it(tmp_path, tiny_data_dir):
    sweep_dir = tmp_path / "sweep"
    common = ["-m", *SLOW_ARGS, f"data_dir={tiny_data_dir}", "algo=naive,ewc", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "cl_runner.cli", *common], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    _wait_for_glob(sweep_dir, f"algo=naive,*/{checkpoint.FILENAME}", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before SIGTERM arrived")
    assert proc.returncode == 143, err
    command = _printed_command(err)
    assert command.startswith("clrun -m ") and command.endswith("resume=auto")
    done = _run_printed(command, tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = sorted(p.parent.name.split(",")[0] for p in sweep_dir.glob("*/results.json"))
    assert jobs == ["algo=ewc", "algo=naive"]
    assert "resuming after task" in done.stderr  # the interrupted job continued


@pytest.mark.parametrize("value", ["/tmp/a=b,seed=0", "/tmp/it's", "/tmp/back\\slash", "/tmp/sp ace",
                                   "/tmp/q\\'x", "/tmp/end\\", "/tmp/$HOME/`x`!"])
def test_quoted_values_survive_the_shell_and_hydra(value):
    """What the recovery command does to a folder: quoted for Hydra, then for the shell; the
    shell and Hydra's parser give the folder back unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_runner.cli import hydra_value, quote_arg

    arg = quote_arg(f"hydra.run.dir={hydra_value(value)}")
    echoed = subprocess.run(["bash", "-c", f"printf '%s' {arg}"], capture_output=True, text=True).stdout
    (o,) = OverridesParser.create().parse_overrides([echoed])
    assert o.value() == value


# -- 8. a full disk -------------------------------------------------------------------------------
def _full_disk_for(names):
    """A stand-in for the low-level write that fails with ENOSPC for files named in ``names``."""
    import errno

    from cl_runner.utils import io as clio

    real = clio._write_fd

    def write(fd, data, path):
        if Path(path).name in names:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, path)

    return write


def test_a_full_disk_is_a_clean_error_naming_the_file_and_the_space_left(tmp_path, tiny_data_dir, monkeypatch):
    from cl_runner.errors import WriteError
    from cl_runner.utils import io as clio

    monkeypatch.setattr(clio, "_write_fd", _full_disk_for({"results.json"}))
    cfg = tiny(tiny_data_dir, loggers=["jsonl", "csv", "plots"])
    with pytest.raises(WriteError) as info:
        run_experiment(cfg, tmp_path, console=quiet())
    message = str(info.value)
    assert str(tmp_path / "results.json") in message and "the disk is full" in message and " free in " in message
    assert isinstance(info.value, ClrunError) and isinstance(info.value, OSError)
    # Nothing half-written: no results file, no temporary file, and the plots (written after the
    # results) were not attempted.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".results")) == []
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "acc_matrix.png").exists()
    error = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert error["event"] == "error" and error["type"] == "WriteError" and "results.json" in error["message"]


def test_a_full_disk_at_the_plots_leaves_the_results_written(tmp_path, tiny_data_dir, monkeypatch):
    from cl_runner.errors import WriteError
    from cl_runner.utils import io as clio

    monkeypatch.setattr(clio, "_write_fd", _full_disk_for({"acc_matrix.png"}))
    with pytest.raises(WriteError, match="acc_matrix.png"):
        run_experiment(tiny(tiny_data_dir, loggers=["plots"]), tmp_path, console=quiet())
    assert read_results(tmp_path)["avg_acc"] is not None


def test_a_full_disk_at_the_last_checkpoint_still_writes_the_results(tmp_path, tiny_data_dir, monkeypatch):
    from cl_runner.utils import io as clio

    calls = []
    full = _full_disk_for({checkpoint.FILENAME})
    real = clio._write_fd

    def write(fd, data, path):
        if Path(path).name == checkpoint.FILENAME:
            calls.append(path)
            if len(calls) == 2:  # the checkpoint after the last of the two tasks
                return full(fd, data, path)
        return real(fd, data, path)

    monkeypatch.setattr(clio, "_write_fd", write)
    res = run_experiment(tiny(tiny_data_dir), tmp_path, console=quiet())
    assert read_results(tmp_path)["avg_acc"] == res["avg_acc"]
    assert checkpoint.load(tmp_path / checkpoint.FILENAME)["loop"]["completed_tasks"] == 1


def test_a_full_disk_through_the_command_line_exits_2_and_logs_the_error(tmp_path, tiny_data_dir):
    run_dir = tmp_path / "run"
    script = ("import errno, os, sys\n"
              "from pathlib import Path\n"
              "from cl_runner.utils import io as clio\n"
              "real = clio._write_fd\n"
              "def write(fd, data, path):\n"
              "    if Path(path).name == 'results.json':\n"
              "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              "    return real(fd, data, path)\n"
              "clio._write_fd = write\n"
              "from cl_runner.cli import main\n"
              "sys.argv = ['clrun', *sys.argv[1:]]\n"
              "main()\n")
    res = subprocess.run([sys.executable, "-c", script, *ARGS, f"data_dir={tiny_data_dir}",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "300"})
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "the disk is full" in res.stderr
    assert "error: could not write" in (run_dir / "cli.log").read_text()
    assert json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])["event"] == "error"


def _fds_open_on(path) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd) == str(path)
        except OSError:
            pass
    return count


linux_fds = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")


@linux_fds
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_at_the_event_log_is_a_clean_error_and_closes_the_loggers(tmp_path, tiny_data_dir):
    """events.jsonl on a device where every write fails with ENOSPC (/dev/full): the run stops
    with a WriteError naming the file and the space left, and no logger keeps a file open."""
    from cl_runner.errors import WriteError

    (tmp_path / "events.jsonl").symlink_to("/dev/full")
    before = _fds_open_on("/dev/full")
    with pytest.raises(WriteError) as info:
        run_experiment(tiny(tiny_data_dir, loggers=["csv", "jsonl"]), tmp_path, console=quiet())
    message = str(info.value)
    assert str(tmp_path / "events.jsonl") in message and "the disk is full" in message and " free in " in message
    assert _fds_open_on("/dev/full") == before
    assert not (tmp_path / "results.json").exists()


def test_a_full_disk_at_the_csv_stops_the_run_with_the_last_checkpoint_kept(tmp_path, tiny_data_dir, monkeypatch):
    """acc_matrix.csv cannot be rewritten after task 2: a WriteError naming it; the checkpoint
    after task 1 stays, and the run continues from it once there is room."""
    import errno

    from cl_runner.errors import WriteError
    from cl_runner.utils import io as clio

    real, calls = clio._write_fd, []

    def write(fd, data, path):
        if Path(path).name == "acc_matrix.csv":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, path)

    monkeypatch.setattr(clio, "_write_fd", write)
    cfg = tiny(tiny_data_dir, loggers=["jsonl", "csv"])
    with pytest.raises(WriteError, match=r"could not write .*acc_matrix\.csv: the disk is full"):
        run_experiment(cfg, tmp_path, console=quiet())
    assert checkpoint.load(tmp_path / checkpoint.FILENAME)["loop"]["completed_tasks"] == 1
    assert (tmp_path / "acc_matrix.csv").read_text().count("\n") == 2  # header and task 1, intact
    monkeypatch.setattr(clio, "_write_fd", real)
    done = run_experiment({**cfg, "resume": True}, tmp_path, console=quiet())
    assert done["resumed"] is True and (tmp_path / "acc_matrix.csv").read_text().count("\n") == 3


@linux_fds
def test_a_full_disk_under_tensorboard_is_one_clean_error(tmp_path, tiny_data_dir, monkeypatch, capfd):
    """TensorBoard writes from a thread of its own; a full disk there surfaces in the run as a
    WriteError naming the folder, without the thread's traceback on stderr."""
    pytest.importorskip("torch.utils.tensorboard")
    import errno

    from tensorboard.summary.writer import record_writer

    from cl_runner.errors import WriteError

    real, calls = record_writer.RecordWriter.write, []

    def write(self, data):
        calls.append(len(data))
        if len(calls) > 1:  # the file's header event goes through, the first scalar does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    with pytest.raises(WriteError) as info:
        run_experiment(tiny(tiny_data_dir, loggers=["tensorboard"]), tmp_path, console=quiet())
    assert str(tmp_path / "tensorboard") in str(info.value) and "the disk is full" in str(info.value)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    assert _fds_open_on(event_file) == 0


def test_an_event_log_that_cannot_be_created_is_a_clean_error(tmp_path, tiny_data_dir):
    from cl_runner.errors import WriteError

    (tmp_path / "events.jsonl").mkdir()
    with pytest.raises(WriteError, match=r"could not write .*events\.jsonl: Is a directory"):
        run_experiment(tiny(tiny_data_dir, loggers=["csv", "jsonl"]), tmp_path, console=quiet())


@linux_fds
def test_a_full_disk_at_the_plots_still_closes_every_logger(tmp_path, tiny_data_dir, monkeypatch):
    """The plots fail after results.json is written: the loggers after them are still closed,
    and the error is recorded in events.jsonl."""
    from cl_runner.errors import WriteError
    from cl_runner.utils import io as clio

    monkeypatch.setattr(clio, "_write_fd", _full_disk_for({"acc_matrix.png"}))
    with pytest.raises(WriteError, match="acc_matrix.png"):
        run_experiment(tiny(tiny_data_dir, loggers=["plots", "jsonl"]), tmp_path, console=quiet())
    assert read_results(tmp_path)["avg_acc"] is not None
    assert _fds_open_on(tmp_path / "events.jsonl") == 0
    events = [json.loads(line)["event"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1] == "error" and "final" not in events


def test_a_full_disk_at_the_plots_of_vectorized_seeds_leaves_every_seeds_results(tmp_path, tiny_data_dir, monkeypatch):
    """JAX seeds trained together: every seed's results.json is written before any plot."""
    pytest.importorskip("jax")
    from cl_runner.errors import WriteError
    from cl_runner.utils import io as clio

    monkeypatch.setattr(clio, "_write_fd", _full_disk_for({"acc_matrix.png"}))
    cfg = tiny(tiny_data_dir, seeds=[0, 1], backend={"name": "jax"}, loggers=["plots"])
    with pytest.raises(WriteError, match=r"seed=0.*acc_matrix\.png"):
        run_experiment(cfg, tmp_path, console=quiet())
    assert read_results(tmp_path / "seed=0")["vectorized_seeds"] == [0, 1]
    assert read_results(tmp_path / "seed=1")["avg_acc"] is not None


# -- 9. values checked at config time, the same on both backends ----------------------------------
@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("section, key, value, words", [
    ("optimizer", "lr", float("nan"), "optimizer.lr' must be a positive number"),
    ("optimizer", "lr", float("inf"), "optimizer.lr' must be a positive number"),
    ("optimizer", "momentum", -0.5, "optimizer.momentum' must be a finite number >= 0"),
    ("optimizer", "weight_decay", -1e-4, "optimizer.weight_decay' must be a finite number >= 0"),
    ("optimizer", "grad_clip_norm", 0.0, "optimizer.grad_clip_norm' must be a positive number"),
    ("optimizer", "grad_clip_norm", -1.0, "optimizer.grad_clip_norm' must be a positive number"),
    ("optimizer", "lr_decay", -0.8, "optimizer.lr_decay' must be a finite number >= 0"),
    ("optimizer", "betas", [0.9, 1.0], "optimizer.betas' must be two numbers in [0, 1)"),
    ("optimizer", "betas", [-0.1, 0.999], "optimizer.betas' must be two numbers in [0, 1)"),
    ("backbone", "width", 0, "backbone.width' must be a positive number"),
    ("backbone", "n_hidden_layers", -1, "backbone.n_hidden_layers' must be a finite number >= 0"),
    (None, "seed", -1, "'seed' must be an integer in [0, 2**32)"),
])
def test_bad_values_are_config_errors_on_both_backends(backend, section, key, value, words):
    from cl_runner.config import validate_config

    cfg = {"backend": {"name": backend}}
    if section:
        cfg[section] = {key: value}
    else:
        cfg[key] = value
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert words in str(info.value)


def test_a_bad_value_stops_the_command_before_any_data_is_read(tmp_path):
    res = run_clrun(["optimizer.momentum=-0.5", "backend=jax", f"data_dir={tmp_path / 'no-data'}",
                     f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert res.returncode == 2 and "optimizer.momentum" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


# -- 10. what used to be tracebacks --------------------------------------------------------------
def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "bad.yaml").write_text("defaults:\n  - benchmark: splitmnist\nalgo:\n  name: ewc\n"
                                   "  ewc_lambda: [1, 2\nseed: 1\n")
    res = run_clrun(["--config-dir", str(conf), "--config-name", "bad"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    message = " ".join(res.stderr.split())
    assert f"YAML syntax error in {conf / 'bad.yaml'}, line 6, column 5" in message
    assert "started at line 5, column 15" in message


def test_a_broken_sweep_file_names_line_and_column(tmp_path):
    from cl_runner import sweeps

    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "broken.yaml").write_text("hydra:\n  sweeper:\n    params: {seed: 0,1\n")
    (tmp_path / "expected").mkdir()
    sweeps.register_sweep_files(tmp_path / "sweeps", tmp_path / "expected")
    message = sweeps.broken_sweep_file("broken")
    assert "line 4, column 1" in message and str(tmp_path / "sweeps" / "broken.yaml") in message


def test_config_dir_errors(tmp_path, tiny_data_dir):
    missing = run_clrun(["--config-dir", str(tmp_path / "nowhere")], tmp_path)
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    no_name = run_clrun(["--config-dir", str(empty), "--config-name", "mine"], tmp_path)
    assert no_name.returncode == 2 and "no config 'mine'" in no_name.stderr
    # A --config-dir without config.yaml: Hydra takes clrun's own config, and so does the check of
    # the command line (which used to be skipped here).
    typo = run_clrun(["--config-dir", str(empty), "algo.ewc_lambdaa=5"], tmp_path)
    assert typo.returncode == 2 and "Did you mean 'algo.ewc_lambda'" in " ".join(typo.stderr.split())
    ok = run_clrun(["--config-dir", str(empty), *ARGS, f"data_dir={tiny_data_dir}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_an_unwritable_sweep_dir_is_a_clean_error(tmp_path, tiny_data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = run_clrun(["-m", *ARGS, "seed=0,1", f"data_dir={tiny_data_dir}", f"hydra.sweep.dir={blocker / 'sweep'}"],
                    tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hydra.sweep.dir=" in res.stderr and "not writable" in res.stderr


def test_optuna_interval_errors_and_a_study_whose_every_trial_fails(tmp_path, tiny_data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    common = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", *ARGS,
              f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    reversed_ = run_clrun([*common, "optimizer.lr=interval(0.1,0.001)", f"data_dir={tiny_data_dir}"], tmp_path)
    assert reversed_.returncode == 2 and "Traceback" not in reversed_.stderr
    assert "optimizer.lr=interval(0.001, 0.1)" in " ".join(reversed_.stderr.split())
    log_zero = run_clrun([*common, "optimizer.lr=tag(log,interval(0,0.1))", f"data_dir={tiny_data_dir}"], tmp_path)
    assert log_zero.returncode == 2 and "log scale" in log_zero.stderr
    failing = run_clrun([*common, "optimizer.lr=interval(0.001,0.1)", f"data_dir={tmp_path / 'no-data'}"],
                        tmp_path)
    assert failing.returncode == 2, failing.stderr
    assert "Traceback" not in failing.stderr and "every trial of the Optuna study failed" in failing.stderr


# -- 11. a failed run records its error ----------------------------------------------------------
def test_a_failed_run_records_its_error_in_cli_log_and_events(tmp_path):
    run_dir = tmp_path / "run"
    res = run_clrun([*ARGS, f"data_dir={tmp_path / 'no-data'}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    log = (run_dir / "cli.log").read_text()
    assert "error:" in log and "no-data" in log
    (event,) = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "error" and event["type"] == "DataError" and "no-data" in event["message"]


# -- 12. small ones --------------------------------------------------------------------------------
def test_a_diverging_loss_counts_tasks_and_epochs_from_one():
    import torch

    from cl_runner import catalog
    from cl_runner.config import validate_config
    from cl_runner.errors import TrainingDivergedError

    from test_jax_backend import tiny_stream

    stream = tiny_stream(num_tasks=2, n_train=40)
    stream.tasks[1].train_x = stream.tasks[1].train_x.astype(np.float32)
    typed, _ = validate_config({"algo": {"name": "naive"}, "backbone": {"width": 8},
                                "benchmark": {"batch_size": 8}, "optimizer": {"lr": 1e30}})
    learner = catalog.load_backend("torch").build_learner(typed, stream, torch.device("cpu"), 0)
    from cl_runner.core.loop import ContinualLoop

    with pytest.raises(TrainingDivergedError, match=r"at task 1 \(of 2\), epoch 1, step"):
        ContinualLoop(learner, stream, []).run()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_result_files_are_readable_like_the_rest(tmp_path, tiny_data_dir, umask, mode):
    """Files written atomically get 0644 less the umask, as any other file (mkstemp alone gives 0600)."""
    old = os.umask(umask)
    try:
        run_experiment(tiny(tiny_data_dir, loggers=["jsonl", "csv", "plots"]), tmp_path, console=quiet())
    finally:
        os.umask(old)
    for name in ("results.json", checkpoint.FILENAME, "acc_matrix.csv", "acc_matrix.png", "events.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_resume_ignores_keys_that_cannot_change_the_numbers(tmp_path, tiny_data_dir):
    run_experiment(tiny(tiny_data_dir), tmp_path, console=quiet())
    res = run_experiment(tiny(tiny_data_dir, resume=True, progress=True, benchmark={"cache": False, "eval_batch_size": 7},
                              training={"progress_every": 3}), tmp_path, console=quiet())
    assert res["resumed"] is True
    from cl_runner.checkpoint import config_differences

    assert config_differences({"benchmark": {"cache": True}, "algo": {"name": "ewc"}},
                              {"benchmark": {"cache": False}, "algo": {"name": "ewc"}}) == []


def test_config_drift_on_resume_is_found_before_any_data_is_read(tmp_path, tiny_data_dir):
    run_experiment(tiny(tiny_data_dir), tmp_path, console=quiet())
    # data_dir may differ on resume; here it names no data, so only an early check can answer.
    with pytest.raises(CheckpointError, match=r"different config: optimizer.lr \(0.01 -> 0.5\)"):
        run_experiment(tiny(tmp_path / "no-data", resume=True, optimizer={"lr": 0.5}), tmp_path, console=quiet())


def test_a_subset_larger_than_a_task_is_a_warning_also_from_the_cache(tiny_data_dir, tmp_path, capfd):
    for _ in range(2):  # built, then read from the cache
        stream = _build(tiny_data_dir, tmp_path, name="splitmnist", subset=200, test_subset=10)
        err = capfd.readouterr().err
        assert "benchmark.subset=200 is more than some tasks have" in err and "task 1 has" in err
        assert "test_subset" not in err
        assert all(t.num_train < 200 for t in stream.tasks)
