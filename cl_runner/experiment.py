"""One continual-learning run, top to bottom: config -> stream -> learner -> loop -> results."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cl_runner import checkpoint, metrics, versions
from cl_runner.benchmarks import build_stream
from cl_runner.callbacks.loggers import _gpu_peak_mb, build_loggers, peak_rss_mb
from cl_runner.callbacks.progress import RichProgress
from cl_runner.callbacks.summary import print_summary
from cl_runner.catalog import load_backend
from cl_runner.config import validate_config
from cl_runner.core.callbacks import Callback
from cl_runner.core.loop import ContinualLoop
from cl_runner.registry import ALGORITHMS, BACKBONES, PLUGINS
from cl_runner.utils.io import atomic_write_json, check_writable


def choose_threads(threads, backbone_cfg, batch_size: int, cpu_count: int | None = None) -> tuple[int, int]:
    """(training threads, evaluation threads) for CPU runs.

    Measured on a 2-core machine (docs/PERFORMANCE.md): an MLP step at batch 10 runs about 2x
    faster on one intra-op thread than on two, because the matrices are too small to split;
    evaluation batches of 1000+ samples do gain from every core. ``auto`` therefore trains small
    fully connected models on one thread, and uses all cores otherwise and for evaluation.
    """
    cores = cpu_count or os.cpu_count() or 1
    if threads != "auto":
        return int(threads), int(threads)
    small = backbone_cfg.type == "mlp" and batch_size * backbone_cfg.width <= 64 * 1024
    return (1 if small else cores), cores


def run_experiment(cfg: DictConfig | dict, output_dir: str | os.PathLike, console: Console | None = None,
                   callbacks: list | None = None, cpu_count: int | None = None) -> dict:
    """Run the experiment described by ``cfg``; write and return its results.

    ``cpu_count`` is the number of cores this run may use (e.g. its share when parallel sweep
    jobs run on one machine); None: every core. ``threads: auto`` chooses within it.
    """
    console = console or Console()
    err_console = Console(stderr=True)
    t_start = time.perf_counter()
    typed, warnings = validate_config(cfg)
    for w in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    out = check_writable(output_dir)
    backend = load_backend(typed.backend.name)
    ALGORITHMS.get(typed.algo.name, backend=typed.backend.name)  # fail before loading any data
    for plugin in typed.algo.plugins:
        PLUGINS.get(plugin, backend=typed.backend.name)
    BACKBONES.get(typed.backbone.type, backend=typed.backend.name)
    device = backend.resolve_device(typed.device)
    seed = int(typed.seed)
    train_threads, eval_threads = choose_threads(typed.threads, typed.backbone, typed.benchmark.batch_size,
                                                 cpu_count=cpu_count)
    backend.seed_everything(seed, typed.backend.deterministic)

    t0 = time.perf_counter()
    stream = build_stream(typed.benchmark, seed, typed.data_dir, typed.cache_dir)
    data_time = time.perf_counter() - t0
    err_console.print(f"{stream.describe()} (ready in {data_time:.1f}s)", highlight=False)

    learner = backend.build_learner(typed, stream, device, seed)
    if device.type == "cpu" and hasattr(learner, "set_threads"):
        learner.set_threads(train_threads, eval_threads)
    config = OmegaConf.to_container(typed, resolve=True)
    loggers = build_loggers([n for n in typed.loggers if n != "console"], out, typed)
    cbs = [RichProgress(err_console, live=typed.progress)] if "console" in typed.loggers else []
    cbs += [*loggers, *(callbacks or [])]
    ckpt_path = Path(out) / checkpoint.FILENAME
    if typed.checkpoint:
        cbs.append(CheckpointCallback(ckpt_path, config))
    loop = ContinualLoop(learner, stream, cbs, epochs_per_task=typed.training.epochs_per_task,
                         eval_on=typed.training.eval_on, eval_initial=typed.training.eval_initial)
    if typed.resume:
        source = ckpt_path if typed.resume is True else _checkpoint_in(typed.resume)
        checkpoint.restore(checkpoint.load(source), learner, loop.state, config, source)
        err_console.print(f"resuming after task {loop.state.completed_tasks} of {stream.num_tasks} "
                          f"from {source}", highlight=False)
    try:
        with _sigterm_as_interrupt():
            state = loop.run()
    except BaseException as ex:
        for cb in cbs:
            cb.on_interrupt(loop)
        if isinstance(ex, KeyboardInterrupt) and typed.checkpoint and loop.state.completed_tasks:
            err_console.print(f"interrupted during task {loop.state.completed_tasks + 1}; the checkpoint "
                              f"after task {loop.state.completed_tasks} is in {out}. Continue with: "
                              f"clrun <same overrides> resume={out}", highlight=False)
        raise

    summary = metrics.summarize(state.acc_matrix, state.initial_acc)
    total_steps = sum(state.steps_per_task)
    train_time = sum(state.train_time_s)
    results = {
        **summary,
        "acc_matrix": state.acc_matrix,
        "initial_acc": state.initial_acc,
        "per_task_time_s": state.task_time_s,
        "per_task_train_time_s": state.train_time_s,
        "per_task_eval_time_s": state.eval_time_s,
        "epoch_losses": state.epoch_losses,
        "data_time_s": data_time,
        "total_time_s": time.perf_counter() - t_start,
        "steps": total_steps,
        "steps_per_s": total_steps / train_time if train_time > 0 else 0.0,
        "num_parameters": learner.num_parameters(),
        "model_size_mb": learner.num_parameters() * 4 / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mem_mb": _gpu_peak_mb(),
        "resumed": bool(typed.resume),
        "device": str(device),
        "threads": {"train": train_threads, "eval": eval_threads} if device.type == "cpu" else None,
        "seed": seed,
        "algo": typed.algo.name,
        "benchmark": typed.benchmark.name,
        "scenario": stream.scenario,
        "backend": typed.backend.name,
        "config": config,
        "versions": {**versions.collect(), **backend.versions()},
    }
    results["expected"] = check_expected(typed, results)
    path = Path(out) / typed.results_file
    atomic_write_json(path, results)
    for logger in loggers:
        logger.log_final(results)
        logger.close()
    print_summary(_jsonable(results), console)
    if results["expected"] is not None:
        print_expected(results["expected"], console)
    console.print(f"results: {path}", highlight=False)
    return results


class CheckpointCallback(Callback):
    """Writes the checkpoint after every task (atomically)."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config

    def on_after_task(self, loop, task) -> None:
        checkpoint.save(self.path, loop.learner, loop.state, self.config)


def _checkpoint_in(resume) -> Path:
    p = Path(str(resume)).expanduser()
    return p if p.suffix == ".pt" else p / checkpoint.FILENAME


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: the last complete
    task's checkpoint stays, loggers are closed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _jsonable(results: dict) -> dict:
    from cl_runner.utils.io import to_jsonable

    return to_jsonable(results)


def check_expected(typed, results: dict) -> dict | None:
    exp = typed.expected
    if exp is None or exp.value is None:
        return None
    measured = results.get(exp.metric)
    ok = measured is not None and abs(measured - exp.value) <= exp.tolerance
    return {"metric": exp.metric, "expected": exp.value, "tolerance": exp.tolerance, "measured": measured,
            "delta": None if measured is None else measured - exp.value,
            "status": "PASS" if ok else "FAIL", "source": exp.source, "seeds": exp.seeds,
            "known_gap": exp.known_gap}


def print_expected(e: dict, console: Console) -> None:
    colour = "green" if e["status"] == "PASS" else "red"
    measured = "-" if e["measured"] is None else f"{e['measured']:.2f}"
    note = "" if e["seeds"] <= 1 else f" (this is one run; the published number is a mean over {e['seeds']} seeds)"
    console.print(f"expected {e['metric']} {e['expected']:.2f} +- {e['tolerance']:.2f}"
                  f" ({e['source'] or 'no source given'}); measured {measured}: "
                  f"[bold {colour}]{e['status']}[/]{note}", highlight=False)
