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
from cl_runner.sweeps import usable_cores
from cl_runner.utils.io import atomic_write_json, check_writable


def choose_threads(threads, backbone_cfg, batch_size: int, cpu_count: int | None = None) -> tuple[int, int]:
    """(training threads, evaluation threads) for CPU runs.

    Measured on a 2-core machine (docs/PERFORMANCE.md): an MLP step at batch 10 runs about 2x
    faster on one intra-op thread than on two, because the matrices are too small to split;
    evaluation batches of 1000+ samples do gain from every core. ``auto`` therefore trains small
    fully connected models on one thread, and uses all cores otherwise and for evaluation.
    """
    cores = cpu_count or usable_cores()
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
    if typed.seeds is not None:
        return run_seeds(typed, out, console, err_console, callbacks, cpu_count, t_start)
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
                         eval_on=typed.training.eval_on, eval_initial=typed.training.eval_initial,
                         eval_task_il=typed.training.eval_task_il)
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

    results = collect_results(typed, state, learner, device, backend, stream, config, data_time, t_start,
                              (train_threads, eval_threads))
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


def collect_results(typed, state, learner, device, backend, stream, config: dict, data_time: float,
                    t_start: float, threads: tuple[int, int]) -> dict:
    """The results.json of one run (one seed) from its loop state."""
    train_threads, eval_threads = threads
    seed = int(typed.seed)
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
        # which update and pixel-gather paths ran, and why (backends/torch/update.py, benchmarks/pixels.py)
        "kernels": {"update": getattr(learner, "kernel_record", dict)() or None,
                    "gather": getattr(stream, "gather", None)},
    }
    if state.acc_matrix_task_il is not None:  # training.eval_task_il
        results.update(metrics.summarize_task_il(state.acc_matrix_task_il),
                       acc_matrix_task_il=state.acc_matrix_task_il)
    results["expected"] = check_expected(typed, results)
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


# -- several seeds in one run (``seeds=[...]``) ---------------------------------------------------

#: The metrics aggregate.json summarises over seeds.
AGGREGATE_METRICS = ("avg_acc", "forgetting", "bwt", "fwt")
#: Also summarised when the runs have them (training.eval_task_il).
AGGREGATE_TASK_IL_METRICS = metrics.TASK_IL_KEYS


def run_seeds(typed, out: Path, console: Console, err_console: Console, callbacks, cpu_count,
              t_start: float) -> dict:
    """Run every seed of ``typed.seeds`` (which replaces ``seed``), each as the single run of that
    seed would be, in ``<out>/seed=<s>/``; write ``<out>/aggregate.json`` and print the table.

    backend=jax trains the seeds together (cl_runner/backends/jax/seeds.py) unless the algorithm
    cannot be vectorised; torch runs them one after another. Returns the aggregate, whose
    ``avg_acc``, ``forgetting``, ``bwt`` and ``fwt`` are the means over seeds (a sweep's objective).
    """
    seeds = [int(s) for s in typed.seeds]
    base = OmegaConf.to_container(typed, resolve=True)
    seed_configs = []
    for s in seeds:
        c = OmegaConf.to_container(OmegaConf.create(base))
        c["seed"], c["seeds"] = s, None
        seed_configs.append(c)
    reason = None
    if typed.backend.name == "jax":
        from cl_runner.backends.jax.seeds import vectorization_blocker

        reason = vectorization_blocker(ALGORITHMS.get(typed.algo.name, backend="jax"),
                                       [PLUGINS.get(p, backend="jax") for p in typed.algo.plugins])
        if reason:
            err_console.print(f"{len(seeds)} seeds one after another: {reason}.", highlight=False)
    else:
        err_console.print(f"{len(seeds)} seeds one after another (the {typed.backend.name} backend runs "
                          f"seeds sequentially; backend=jax trains them together).", highlight=False)
    compilations = None
    if typed.backend.name == "jax" and reason is None:
        per_seed, compilations = _run_vectorized(typed, seeds, seed_configs, out, err_console, callbacks,
                                                 cpu_count, t_start)
    else:
        per_seed = [run_experiment(c, out / f"seed={s}", console=console, callbacks=callbacks,
                                   cpu_count=cpu_count) for s, c in zip(seeds, seed_configs)]
    aggregate = aggregate_results(per_seed)
    aggregate.update(vectorized=compilations is not None, compilations=compilations,
                     total_time_s=time.perf_counter() - t_start,
                     runs=[f"seed={s}/{typed.results_file}" for s in seeds])
    aggregate["expected"] = check_expected(typed, aggregate)
    path = Path(out) / "aggregate.json"
    atomic_write_json(path, aggregate)
    print_aggregate(aggregate, console)
    if aggregate["expected"] is not None:
        print_expected(aggregate["expected"], console)
    console.print(f"aggregate: {path}", highlight=False)
    return aggregate


def _run_vectorized(typed, seeds, seed_configs, out: Path, err_console: Console, callbacks, cpu_count,
                    t_start: float) -> tuple[list[dict], dict]:
    """All seeds on the jax backend as one compiled program per epoch and device (jax/seeds.py);
    (per-seed results, compilation counts). Seeds whose streams are the same share one stream."""
    from cl_runner.backends.jax.seeds import SeedGroup
    from cl_runner.benchmarks.builder import cache_key

    backend = load_backend("jax")
    device = backend.resolve_device(typed.device)
    train_threads, eval_threads = choose_threads(typed.threads, typed.backbone, typed.benchmark.batch_size,
                                                 cpu_count=cpu_count)
    backend.seed_everything(seeds[0], typed.backend.deterministic)
    streams: dict[str, object] = {}
    runs, loops = [], []
    devices = None
    for i, (s, c) in enumerate(zip(seeds, seed_configs)):
        typed_s, _ = validate_config(c)
        key = cache_key(typed_s.benchmark, s)
        t0 = time.perf_counter()
        if key not in streams:
            streams[key] = build_stream(typed_s.benchmark, s, typed_s.data_dir, typed_s.cache_dir)
            err_console.print(f"seed {s}: {streams[key].describe()} (ready in {time.perf_counter() - t0:.1f}s)",
                              highlight=False)
        stream = streams[key]
        data_time = time.perf_counter() - t0
        if devices is None:  # long runs, or a chosen device count: seeds spread over the CPU devices
            long_run = SeedGroup.long_run(stream, typed_s.benchmark.batch_size, typed_s.training.epochs_per_task)
            devices = (backend.seed_devices(device, len(seeds), cpu_count)
                       if long_run or backend.cpu_devices_chosen() else [device] * len(seeds))
        learner = backend.build_learner(typed_s, stream, devices[i], s)
        if device.type == "cpu" and hasattr(learner, "set_threads"):
            learner.set_threads(train_threads, eval_threads)
        run_out = check_writable(Path(out) / f"seed={s}")
        config = OmegaConf.to_container(typed_s, resolve=True)
        loggers = build_loggers([n for n in typed_s.loggers if n != "console"], run_out, typed_s)
        show = "console" in typed_s.loggers and i == 0  # one progress display for the group
        cbs = [RichProgress(err_console, live=typed_s.progress)] if show else []
        cbs += [*loggers, *(callbacks or [])]
        if typed_s.checkpoint:
            cbs.append(CheckpointCallback(run_out / checkpoint.FILENAME, config))
        loops.append(ContinualLoop(learner, stream, cbs, epochs_per_task=typed_s.training.epochs_per_task,
                                   eval_on=typed_s.training.eval_on, eval_initial=typed_s.training.eval_initial,
                                   eval_task_il=typed_s.training.eval_task_il))
        runs.append((typed_s, run_out, loggers, cbs, config, data_time))
    group = SeedGroup(loops, note=lambda m: err_console.print(m, highlight=False))
    how = "one vmapped program per epoch" if group.program == "vmap" else "one program per epoch"
    if len(group.cohorts) > 1:
        parts = " | ".join(",".join(str(seeds[i]) for i in members) for members in group.cohorts)
        how += f" on each of {len(group.cohorts)} CPU devices, side by side: seeds {parts}"
    err_console.print(f"{len(seeds)} seeds {seeds} trained together ({how})", highlight=False)
    try:
        with _sigterm_as_interrupt():
            states = group.run()
    except BaseException:
        for (_, _, _, cbs, _, _), loop in zip(runs, loops):
            for cb in cbs:
                cb.on_interrupt(loop)
        raise
    per_seed = []
    for (typed_s, run_out, loggers, _, config, data_time), loop, state in zip(runs, loops, states):
        results = collect_results(typed_s, state, loop.learner, device, backend, loop.stream, config,
                                  data_time, t_start, (train_threads, eval_threads))
        results["vectorized_seeds"] = seeds
        atomic_write_json(Path(run_out) / typed_s.results_file, results)
        for logger in loggers:
            logger.log_final(results)
            logger.close()
        per_seed.append(results)
    return per_seed, group.compilations()


def aggregate_results(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for one seed) over seeds of each metric
    in AGGREGATE_METRICS (and AGGREGATE_TASK_IL_METRICS when the runs have them), with the per-seed
    values; the means also as top-level keys."""
    from cl_runner.report import mean_std

    first = per_seed[0]
    out = {"seeds": [r["seed"] for r in per_seed], "algo": first["algo"], "benchmark": first["benchmark"],
           "scenario": first["scenario"], "backend": first["backend"], "metrics": {}}
    for m in (*AGGREGATE_METRICS, *(m for m in AGGREGATE_TASK_IL_METRICS if m in first)):
        values = [r.get(m) for r in per_seed]
        known = [float(v) for v in values if v is not None and v == v]
        mean, std, _ = mean_std(known)
        entry = {"mean": None if not known else mean, "std": None if len(known) < 2 else std, "values": values}
        out["metrics"][m] = entry
        out[m] = entry["mean"]
    return out


def print_aggregate(aggregate: dict, console: Console) -> None:
    from rich.table import Table

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    names = {"avg_acc": "avg acc %", "forgetting": "forgetting %", "bwt": "BWT %", "fwt": "FWT %",
             "avg_acc_task_il": "avg acc task-IL %", "forgetting_task_il": "forgetting task-IL %",
             "bwt_task_il": "BWT task-IL %"}
    shown = [m for m in (*AGGREGATE_METRICS, *AGGREGATE_TASK_IL_METRICS) if m in aggregate["metrics"]]
    mode = "vectorised" if aggregate.get("vectorized") else "sequential"
    table = Table(title=f"{aggregate['benchmark']} / {aggregate['algo']} / {aggregate['backend']} "
                        f"({len(aggregate['seeds'])} seeds, {mode})")
    table.add_column("seed", justify="right")
    for m in shown:
        table.add_column(names[m], justify="right")
    for i, s in enumerate(aggregate["seeds"]):
        table.add_row(str(s), *(fmt(aggregate["metrics"][m]["values"][i]) for m in shown))
    cells = []
    for m in shown:
        e = aggregate["metrics"][m]
        cells.append("-" if e["mean"] is None else fmt(e["mean"]) + ("" if e["std"] is None else f" ± {fmt(e['std'])}"))
    table.add_row("mean ± std", *cells)
    console.print(table)
