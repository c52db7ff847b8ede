"""Loggers: callbacks that record the run's events to files and tracking services.

Every logger sees the same events through :class:`MetricLogger`: ``log_train`` (training
progress: loss and steps/s at a global step), ``log_epoch``, ``log_task`` (a finished task:
its accuracy row, time, memory) and ``log_final`` (the results). Adding a logger is one small
subclass registered under a name usable in ``loggers=[...]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from cl_runner.core.callbacks import Callback
from cl_runner.errors import ConfigError
from cl_runner.metrics import TASK_IL_KEYS as FINAL_TASK_IL
from cl_runner.registry import CALLBACKS
from cl_runner.utils.io import atomic_write_text, to_jsonable, write_error


def peak_rss_mb() -> float:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class MetricLogger(Callback):
    """Turns loop events into the four logger events."""

    #: The task-IL accuracy matrix of a class-IL run with training.eval_task_il (else None),
    #: as of the latest task.
    acc_matrix_task_il: np.ndarray | None = None

    def __init__(self, run_dir: Path, cfg):
        self.run_dir = Path(run_dir)
        self.cfg = cfg

    # -- events every logger receives ---------------------------------------------------------
    def log_train(self, step: int, metrics: dict) -> None: ...
    def log_epoch(self, task: int, epoch: int, metrics: dict) -> None: ...
    def log_task(self, task: int, metrics: dict, acc_matrix: np.ndarray) -> None: ...
    def log_final(self, results: dict) -> None: ...
    def log_event(self, event: str, payload: dict) -> None:
        """Another event of the run (``resume``); loggers that keep a log record it."""
    def close(self) -> None: ...

    # -- plumbing ----------------------------------------------------------------------------
    def on_progress(self, loop, info: dict) -> None:
        step = loop.state.global_step + info["step"] if info["step"] < info["steps"] else loop.state.global_step
        self.log_train(step, {"loss": info["loss"], "steps_per_s": info["steps_per_s"],
                              "task": info["task"], "epoch": info["epoch"]})

    def on_after_epoch(self, loop, task, epoch, stats) -> None:
        self.log_epoch(task.id, epoch, {k: v for k, v in stats.items() if isinstance(v, (int, float))})

    def on_after_task(self, loop, task) -> None:
        s = loop.state
        row = s.acc_matrix[task.id]
        seen = row[: task.id + 1]
        metrics = {
            "acc": row.tolist(),
            "avg_acc_seen": float(np.nanmean(seen)),
            "train_time_s": s.train_time_s[-1],
            "eval_time_s": s.eval_time_s[-1],
            "steps": s.steps_per_task[-1],
            "steps_per_s": s.steps_per_task[-1] / max(s.train_time_s[-1], 1e-9),
            "loss": s.epoch_losses[-1][-1] if s.epoch_losses[-1] else None,
            "peak_rss_mb": peak_rss_mb(),
        }
        if s.acc_matrix_task_il is not None:  # training.eval_task_il: the same row, task-IL
            row_til = s.acc_matrix_task_il[task.id]
            metrics["acc_task_il"] = row_til.tolist()
            metrics["avg_acc_seen_task_il"] = float(np.nanmean(row_til[: task.id + 1]))
        self.acc_matrix_task_il = s.acc_matrix_task_il
        gpu = _gpu_peak_mb()
        if gpu is not None:
            metrics["gpu_peak_mem_mb"] = gpu
        self.log_task(task.id, metrics, s.acc_matrix)

    def on_after_fit(self, loop) -> None:
        pass

    def on_interrupt(self, loop) -> None:
        """The run is failing or was stopped: release the logger's files. A second failure here
        (the same full disk) must not hide the first one, which is the run's error."""
        try:
            self.close()
        except Exception:
            pass


def _gpu_peak_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:  # pragma: no cover
        pass
    return None


@CALLBACKS.register("console", summary="live progress and one line per task (always useful)")
class ConsoleLogger(MetricLogger):
    """The console output itself comes from RichProgress; this name selects it."""


@CALLBACKS.register("jsonl", summary="events.jsonl: one JSON object per event, valid line by line")
class JsonlLogger(MetricLogger):
    def __init__(self, run_dir, cfg):
        super().__init__(run_dir, cfg)
        self.path = self.run_dir / "events.jsonl"
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as ex:
            raise write_error(self.path, ex) from None

    def _write(self, event: str, payload: dict) -> None:
        if self._fd is None:
            return
        line = json.dumps({"event": event, "time": time.time(), **to_jsonable(payload)}) + "\n"
        try:
            os.write(self._fd, line.encode())  # one write per complete line: never a torn line
        except OSError as ex:
            raise write_error(self.path, ex) from None

    def log_event(self, event, payload):
        self._write(event, payload)

    def log_train(self, step, metrics):
        self._write("train", {"step": step, **metrics})

    def log_epoch(self, task, epoch, metrics):
        self._write("epoch", {"task": task, "epoch": epoch, **metrics})

    def log_task(self, task, metrics, acc_matrix):
        self._write("task", {"task": task, **metrics})

    def log_final(self, results):
        keys = ("avg_acc", "forgetting", "bwt", "fwt", "total_time_s", "steps_per_s", "peak_rss_mb",
                "num_parameters", "model_size_mb")
        final = {k: results.get(k) for k in keys}
        final.update({k: results[k] for k in FINAL_TASK_IL if k in results})
        self._write("final", final)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@CALLBACKS.register("csv", summary="acc_matrix.csv (and acc_matrix_task_il.csv), rewritten atomically after every task")
class CsvLogger(MetricLogger):
    def log_task(self, task, metrics, acc_matrix):
        self._write("acc_matrix.csv", task, acc_matrix)
        if self.acc_matrix_task_il is not None:
            self._write("acc_matrix_task_il.csv", task, self.acc_matrix_task_il)

    def _write(self, name: str, task: int, matrix: np.ndarray) -> None:
        T = matrix.shape[0]
        lines = ["after_task," + ",".join(f"task_{j + 1}" for j in range(T))]
        for i in range(task + 1):
            lines.append(f"{i + 1}," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in matrix[i]))
        atomic_write_text(self.run_dir / name, "\n".join(lines) + "\n")


def accuracy_figures(acc_matrix: np.ndarray):
    """(heatmap, lines) matplotlib figures of an accuracy matrix."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    R = np.asarray(acc_matrix, dtype=float)
    T = R.shape[0]
    heat, ax = plt.subplots(figsize=(1.2 + 0.45 * T, 1.0 + 0.4 * T), dpi=110)
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(T), [str(j + 1) for j in range(T)], fontsize=7)
    ax.set_yticks(range(T), [str(i + 1) for i in range(T)], fontsize=7)
    if T <= 12:
        for i in range(T):
            for j in range(T):
                if not np.isnan(R[i, j]):
                    ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if R[i, j] < 60 else "black")
    heat.colorbar(im, ax=ax, label="accuracy %")
    ax.set_title("accuracy matrix")
    heat.tight_layout()

    lines, ax2 = plt.subplots(figsize=(7, 4), dpi=110)
    x = np.arange(1, T + 1)
    for j in range(T):
        ax2.plot(x[j:], R[j:, j], marker="o", markersize=3, linewidth=1, label=f"task {j + 1}")
    ax2.plot(x, [np.nanmean(R[i, : i + 1]) for i in range(T)], color="black", linewidth=2.5,
             label="mean over seen tasks")
    ax2.set_xticks(x)
    ax2.set_xlabel("after training task")
    ax2.set_ylabel("test accuracy %")
    ax2.set_ylim(0, 100)
    ax2.set_title("accuracy of each task over time")
    if T <= 10:
        ax2.legend(fontsize=7, ncol=2)
    lines.tight_layout()
    return heat, lines


@CALLBACKS.register("plots", summary="acc_matrix.png heatmap and acc_over_time.png lines (matplotlib)")
class PlotLogger(MetricLogger):
    """Draws the final accuracy matrix once the run's results are written (results.json first:
    on a nearly full disk the numbers matter more than their pictures)."""

    def log_final(self, results):
        self._save(np.asarray(results["acc_matrix"], dtype=float))

    def _save(self, acc_matrix):
        import io

        import matplotlib.pyplot as plt

        from cl_runner.utils.io import atomic_write_bytes

        for fig, name in zip(accuracy_figures(acc_matrix), ("acc_matrix.png", "acc_over_time.png")):
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            plt.close(fig)
            atomic_write_bytes(self.run_dir / name, buf.getvalue())


_TB_HOOK_INSTALLED = False


def _quiet_tensorboard_writer_thread_errors() -> None:
    """TensorBoard writes its event file from a background thread; when a write fails (a full
    disk) the thread dies with a traceback on stderr and the same exception is raised again by
    the next ``add_*``/``flush`` in the run's thread, where :class:`TensorBoardLogger` turns it
    into one clean message. This hook drops the thread's own report of such an OSError (only
    that: every other thread exception goes to the previous hook)."""
    global _TB_HOOK_INSTALLED
    if _TB_HOOK_INSTALLED:
        return
    import threading

    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # pragma: no cover - another tensorboard layout: keep Python's report
        return
    previous = threading.excepthook

    def hook(args):
        if isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError):
            return
        previous(args)

    threading.excepthook = hook
    _TB_HOOK_INSTALLED = True


@CALLBACKS.register("tensorboard", summary="TensorBoard scalars per step/task and the accuracy matrix image")
class TensorBoardLogger(MetricLogger):
    """A failed write of the event file (raised by TensorBoard at the next write or flush, which
    happens after every task) is a :class:`cl_runner.errors.WriteError` naming the folder."""

    def __init__(self, run_dir, cfg):
        super().__init__(run_dir, cfg)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("the tensorboard logger needs the 'tensorboard' package: "
                              "pip install tensorboard (or pip install -e '.[logging]').") from None
        _quiet_tensorboard_writer_thread_errors()
        self.path = self.run_dir / "tensorboard"
        self.writer = None
        with self._writing():
            self.writer = SummaryWriter(log_dir=str(self.path))

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as ex:
            raise write_error(self.path, ex) from None

    def log_train(self, step, metrics):
        with self._writing():
            self.writer.add_scalar("train/loss", metrics["loss"], step)
            self.writer.add_scalar("train/steps_per_s", metrics["steps_per_s"], step)

    def log_epoch(self, task, epoch, metrics):
        if "loss" in metrics:
            with self._writing():
                self.writer.add_scalar(f"epoch/loss_task{task + 1}", metrics["loss"], epoch)

    def log_task(self, task, metrics, acc_matrix):
        step = task + 1
        import matplotlib.pyplot as plt

        heat, lines = accuracy_figures(acc_matrix[: task + 1])
        plt.close(lines)
        with self._writing(), contextlib.ExitStack() as figures:
            figures.callback(plt.close, heat)  # add_figure closes it too; this when it is not reached
            for j, acc in enumerate(metrics["acc"]):
                if acc is not None and not np.isnan(acc):
                    self.writer.add_scalar(f"eval/acc_task{j + 1}", acc, step)
            self.writer.add_scalar("eval/avg_acc_seen", metrics["avg_acc_seen"], step)
            if "avg_acc_seen_task_il" in metrics:
                self.writer.add_scalar("eval/avg_acc_seen_task_il", metrics["avg_acc_seen_task_il"], step)
            self.writer.add_scalar("time/train_s", metrics["train_time_s"], step)
            self.writer.add_scalar("system/peak_rss_mb", metrics["peak_rss_mb"], step)
            self.writer.add_figure("eval/acc_matrix", heat, step)
            self.writer.flush()

    def log_final(self, results):
        with self._writing():
            for key in ("avg_acc", "forgetting", "bwt", "fwt", *FINAL_TASK_IL):
                if results.get(key) is not None:
                    self.writer.add_scalar(f"final/{key}", results[key], 0)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with self._writing():
                writer.close()


@CALLBACKS.register("wandb", summary="Weights & Biases (entity/project from the wandb: block; offline without a key)")
class WandbLogger(MetricLogger):
    def __init__(self, run_dir, cfg):
        super().__init__(run_dir, cfg)
        try:
            import wandb
        except ImportError:
            raise ConfigError("the wandb logger needs the 'wandb' package: pip install wandb") from None
        from omegaconf import OmegaConf

        block = OmegaConf.to_container(cfg.wandb, resolve=True) if cfg.wandb is not None else {}
        mode = block.pop("mode", None) or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(entity=block.pop("entity", None), project=block.pop("project", "clrun"),
                              dir=str(self.run_dir), mode=mode,
                              config=OmegaConf.to_container(cfg, resolve=True), **block)

    def log_train(self, step, metrics):
        self.run.log({"train/loss": metrics["loss"], "train/steps_per_s": metrics["steps_per_s"]}, step=step)

    def log_task(self, task, metrics, acc_matrix):
        data = {f"eval/acc_task{j + 1}": a for j, a in enumerate(metrics["acc"]) if a is not None and not np.isnan(a)}
        data["eval/avg_acc_seen"] = metrics["avg_acc_seen"]
        if "avg_acc_seen_task_il" in metrics:
            data["eval/avg_acc_seen_task_il"] = metrics["avg_acc_seen_task_il"]
        self.run.log(data)

    def log_final(self, results):
        for key in ("avg_acc", "forgetting", "bwt", "fwt"):
            self.run.summary[key] = results.get(key)
        for key in FINAL_TASK_IL:
            if key in results:
                self.run.summary[key] = results[key]

    def close(self):
        self.run.finish()


def build_loggers(names, run_dir, cfg) -> list[MetricLogger]:
    """The loggers named in ``names``; when one cannot start (its file cannot be created), those
    already started are closed before the error goes on."""
    loggers: list[MetricLogger] = []
    try:
        for name in names:
            loggers.append(CALLBACKS.get(name)(run_dir, cfg))
    except BaseException:
        for logger in loggers:
            logger.on_interrupt(None)
        raise
    return loggers


def finish_loggers(loggers: list[MetricLogger], results: dict) -> None:
    """Give every logger the final results, in order, then close them all. Called after
    results.json is written, so a failure here (a full disk at the plots) leaves the numbers
    on disk. The first logger that fails stops the final events (the disk is full for the rest
    too); every logger is closed either way, and the first error is raised."""
    error: BaseException | None = None
    for logger in loggers:
        if error is None:
            try:
                logger.log_final(results)
            except BaseException as ex:
                error = ex
        try:
            logger.close()
        except BaseException as ex:
            error = error or ex
    if error is not None:
        raise error
