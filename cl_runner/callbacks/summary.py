"""The table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(v, digits: int = 2, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def print_summary(results: dict, console: Console) -> None:
    R = results["acc_matrix"]
    T = len(R)
    final = R[-1]
    table = Table(title=f"{results['benchmark']} / {results['algo']} / {results['backend']} "
                        f"(seed {results['seed']})", show_lines=False)
    table.add_column("task", justify="right")
    table.add_column("final acc %", justify="right")
    table.add_column("acc just after training %", justify="right")
    til = results.get("acc_matrix_task_il")  # training.eval_task_il
    if til is not None:
        table.add_column("final acc task-IL %", justify="right")
    table.add_column("train s", justify="right")
    for j in range(T):
        extra = [_fmt(til[-1][j])] if til is not None else []
        table.add_row(str(j + 1), _fmt(final[j]), _fmt(R[j][j]), *extra,
                      _fmt(results["per_task_train_time_s"][j], 1))
    console.print(table)
    metrics = Table(show_header=False, box=None)
    metrics.add_column(style="bold")
    metrics.add_column(justify="right")
    metrics.add_row("average accuracy", _fmt(results["avg_acc"], suffix=" %"))
    metrics.add_row("forgetting", _fmt(results["forgetting"], suffix=" %"))
    metrics.add_row("backward transfer (BWT)", _fmt(results["bwt"], suffix=" %"))
    metrics.add_row("forward transfer (FWT)", _fmt(results["fwt"], suffix=" %"))
    if til is not None:
        metrics.add_row("average accuracy, task-IL evaluation", _fmt(results["avg_acc_task_il"], suffix=" %"))
        metrics.add_row("forgetting, task-IL evaluation", _fmt(results["forgetting_task_il"], suffix=" %"))
        metrics.add_row("BWT, task-IL evaluation", _fmt(results["bwt_task_il"], suffix=" %"))
    metrics.add_row("training steps/s", f"{results['steps_per_s']:,.0f}")
    metrics.add_row("total time", f"{results['total_time_s']:.1f} s")
    console.print(metrics)
