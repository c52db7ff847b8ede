"""The live progress display and the per-task lines printed while a run trains."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cl_runner.core.callbacks import Callback


class RichProgress(Callback):
    """Task i/T, epoch, step, loss and steps/s while training; one line per finished task.

    The live bar is drawn only on a terminal (or when asked for); elsewhere only the per-task
    lines are printed, so logs of batch jobs stay readable.
    """

    def __init__(self, console: Console | None = None, live: bool | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.bar = None
        self._t0 = 0.0

    def on_before_fit(self, loop) -> None:
        self._t0 = time.perf_counter()
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]task {task.fields[task]}/{task.fields[tasks]}"),
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("step {task.completed:>6.0f}/{task.total:.0f}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[sps]} steps/s"),
                TimeElapsedColumn(),
                console=self.console, transient=True, refresh_per_second=4,
            )
            self.progress.start()
            self.bar = self.progress.add_task("train", total=1, task=1, tasks=loop.stream.num_tasks,
                                              epoch=1, loss="-", sps="-")

    def on_before_epoch(self, loop, task, epoch) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=0, total=1, task=task.id + 1, epoch=epoch + 1)

    def on_progress(self, loop, info: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=info["step"], total=info["steps"],
                                 loss=f"{info['loss']:.4f}", sps=f"{info['steps_per_s']:,.0f}")

    def on_after_task(self, loop, task) -> None:
        s = loop.state
        t = task.id
        row = s.acc_matrix[t, : t + 1]
        sps = s.steps_per_task[-1] / max(s.train_time_s[-1], 1e-9)
        losses = [x for x in s.epoch_losses[-1] if x is not None]
        loss = f"{losses[-1]:.4f}" if losses else "-"
        self.console.print(
            f"task {t + 1:>2}/{loop.stream.num_tasks}  loss {loss}  "
            f"acc on seen {row.mean():6.2f}%  this task {s.acc_matrix[t, t]:6.2f}%  "
            f"train {s.train_time_s[-1]:6.1f}s ({sps:,.0f} steps/s)  eval {s.eval_time_s[-1]:5.1f}s",
            highlight=False)

    def on_after_fit(self, loop) -> None:
        self._stop()

    def on_interrupt(self, loop) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
