"""``clrun-report <dir>``: one table for a sweep (or any folder of runs).

Every ``results.json`` under the folder is read; runs are grouped by their config, ignoring the
seed (and keys that cannot change a result, such as ``data_dir``); each group gets the mean and
the sample standard deviation (ddof=1, over its seeds) of the average accuracy, forgetting and
BWT, and its number of runs. The best group comes first. ``--format markdown|csv`` writes the
same table for a README or a spreadsheet; ``--plot out.png`` draws the average accuracy of each
group with the standard deviation as error bars.

    clrun-report multirun/rotatedmnist_methods/2025-01-01_12-00-00
    python -m cl_runner.report multirun/ --format markdown --plot accuracy.png
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cl_runner.sweeps import OBJECTIVES

METRICS = ("avg_acc", "forgetting", "bwt")
METRIC_TITLES = {"avg_acc": "avg acc (%)", "forgetting": "forgetting (%)", "bwt": "BWT (%)",
                 "fwt": "FWT (%)", "total_time_s": "time (s)", "steps_per_s": "steps/s"}
# Config keys that never define a group: the seed (runs of one config over seeds are averaged)
# and keys that do not change a run's numbers. A key ignores every key under it too.
IGNORED_KEYS = ("seed", "data_dir", "cache_dir", "progress", "results_file", "loggers", "checkpoint",
                "resume", "overwrite", "objective", "expected", "wandb", "source", "version")
# Short column names for the keys that pick a component.
SHORT_NAMES = {"algo.name": "algo", "benchmark.name": "benchmark", "backbone.type": "backbone",
               "optimizer.type": "optimizer", "backend.name": "backend"}
_ABSENT = "-"


@dataclass
class Run:
    path: Path
    results: dict
    params: dict[str, Any]


@dataclass
class Group:
    params: dict[str, Any]  # the group's value of every grouping key (_ABSENT where a run lacks it)
    runs: list[Run] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        out = []
        for run in self.runs:
            v = run.results.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def stats(self, metric: str) -> tuple[float, float, int]:
        """(mean, sample std with ddof=1, number of values); NaN where undefined (std of one)."""
        return mean_std(self.values(metric))


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"algo": {"name": "ewc"}}`` -> ``{"algo.name": "ewc"}``; lists become tuples."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = tuple(json.dumps(x, sort_keys=True) if isinstance(x, (dict, list)) else x for x in v)
        else:
            out[key] = "{}" if isinstance(v, dict) else v
    return out


def _ignored(key: str, ignored: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignored)


def load_runs(root: Path, results_name: str = "results.json",
              ignored: Sequence[str] = IGNORED_KEYS) -> tuple[list[Run], list[Path]]:
    """The runs under ``root`` and the files that could not be read as results."""
    runs, unreadable = [], []
    for path in sorted(root.rglob(results_name)):
        try:
            results = json.loads(path.read_text())
            config = results["config"]
            assert isinstance(config, dict)
        except (OSError, ValueError, KeyError, AssertionError, TypeError):
            unreadable.append(path)
            continue
        params = {k: v for k, v in flatten(config).items() if not _ignored(k, ignored)}
        runs.append(Run(path.parent, results, params))
    return runs, unreadable


def jobs_without_results(root: Path, results_name: str = "results.json") -> list[Path]:
    """Job folders of Hydra (holding ``.hydra/config.yaml``) without a results file: failed,
    interrupted or still running. A job of several seeds (``seeds=[...]``) keeps each seed's
    results in ``seed=<s>/`` and is complete once its ``aggregate.json`` is written."""
    jobs = (p.parent.parent for p in root.rglob(".hydra/config.yaml"))
    return sorted(job for job in jobs
                  if not (job / results_name).is_file() and not (job / "aggregate.json").is_file())


def group_runs(runs: list[Run]) -> tuple[list[str], list[Group]]:
    """(the keys whose values differ between runs, the groups of runs that agree on all of them)."""
    # Section by section, the component's name first: algo, algo.ewc_lambda, benchmark, ...
    all_keys = sorted({k for r in runs for k in r.params}, key=lambda k: (k.split(".")[0], k not in SHORT_NAMES, k))
    varying = [k for k in all_keys
               if len({repr(r.params.get(k, _ABSENT)) for r in runs}) > 1]
    groups: dict[tuple, Group] = {}
    for run in runs:
        params = {k: run.params.get(k, _ABSENT) for k in varying}
        key = tuple(repr(params[k]) for k in varying)
        groups.setdefault(key, Group(params)).runs.append(run)
    return varying, list(groups.values())


def label_keys(varying: list[str], groups: list[Group]) -> list[str]:
    """The keys worth a column: those with two or more present values. A key only some groups
    have, always with one value (EWC's ewc_lambda beside naive), is implied by another column;
    it is kept only when the groups could not be told apart without it."""
    shown = [k for k in varying if len({repr(g.params[k]) for g in groups if g.params[k] != _ABSENT}) > 1]
    rows = {tuple(repr(g.params[k]) for k in shown) for g in groups}
    return shown if len(rows) == len(groups) else varying


def column_name(key: str) -> str:
    return SHORT_NAMES.get(key, key)


def format_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    if v is None:
        return "null"
    return str(v)


def sort_groups(groups: list[Group], metric: str) -> list[Group]:
    sign = -1.0 if OBJECTIVES.get(metric, "maximize") == "maximize" else 1.0

    def key(g: Group):
        mean = g.stats(metric)[0]
        return (math.isnan(mean), sign * mean if not math.isnan(mean) else 0.0)

    return sorted(groups, key=key)


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def build_rows(groups: list[Group], keys: list[str], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = [column_name(k) for k in keys] or ["config"]
    header += [METRIC_TITLES.get(m, m) for m in metrics] + ["runs"]
    rows = []
    for g in groups:
        row = [format_value(g.params[k]) for k in keys] or ["(all runs)"]
        row += [_pm(*g.stats(m)[:2]) for m in metrics]
        row.append(str(len(g.runs)))
        rows.append(row)
    return header, rows


STD_NOTE = "mean ± standard deviation over seeds (sample std, ddof=1; a single run shows its value)"


def render_table(groups, keys, metrics, title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    header, rows = build_rows(groups, keys, metrics)
    table = Table()
    n_keys = len(header) - len(metrics) - 1
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < n_keys else "right", no_wrap=i >= n_keys)
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    tty = sys.stdout.isatty()
    console = Console(file=buf, width=Console().width if tty else 200, force_terminal=tty, highlight=False)
    console.print(title, style="bold", soft_wrap=True)
    console.print(table)
    console.print(STD_NOTE, soft_wrap=True)
    return buf.getvalue()


def render_markdown(groups, keys, metrics) -> str:
    header, rows = build_rows(groups, keys, metrics)
    n_keys = len(header) - len(metrics) - 1
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < n_keys else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{STD_NOTE[0].upper()}{STD_NOTE[1:]}.\n"


def render_csv(groups, keys, metrics) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([column_name(k) for k in keys]
                    + [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["runs"])
    for g in groups:
        row: list[Any] = [format_value(g.params[k]) for k in keys]
        for m in metrics:
            mean, std, _ = g.stats(m)
            row += ["" if math.isnan(mean) else repr(mean), "" if math.isnan(std) else repr(std)]
        writer.writerow(row + [len(g.runs)])
    return buf.getvalue()


def plot_accuracy(groups: list[Group], keys: list[str], path: Path, metric: str = "avg_acc") -> None:
    """A bar per group: mean of ``metric``, sample std as error bar (none for a single run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [g.stats(metric) for g in groups]
    labels = ["\n".join([f"{column_name(k)}={format_value(g.params[k])}" for k in keys] or ["all runs"])
              + f"\n(n={n})" for g, (_, _, n) in zip(groups, stats)]
    means = [0.0 if math.isnan(m) else m for m, _, _ in stats]
    errs = [0.0 if math.isnan(s) else s for _, s, _ in stats]
    crowded = len(groups) > 6
    longest = max(len(line) for label in labels for line in label.split("\n"))
    per_bar = 0.9 if crowded else max(0.9, 0.07 * longest)  # inches: room for the label under a bar
    fig, ax = plt.subplots(figsize=(min(40.0, max(4.0, per_bar * len(groups) + 1.5)), 4.5 if not crowded else 6))
    ax.bar(range(len(groups)), means, yerr=errs, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    ax.set_ylabel(METRIC_TITLES.get(metric, metric))
    ax.set_title(f"{METRIC_TITLES.get(metric, metric)}: mean ± sample std over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: Path, fmt: str = "table", sort_by: str = "avg_acc", ignore: Sequence[str] = (),
           results_name: str = "results.json", plot: Path | None = None) -> str:
    from cl_runner.errors import ClrunError

    if not root.is_dir():
        raise ClrunError(f"{root} is not a directory.")
    runs, unreadable = load_runs(root, results_name, (*IGNORED_KEYS, *ignore))
    if not runs:
        raise ClrunError(f"no {results_name} with a 'config' under {root}.")
    varying, groups = group_runs(runs)
    keys = label_keys(varying, groups)
    groups = sort_groups(groups, sort_by)
    metrics = list(METRICS) + ([sort_by] if sort_by not in METRICS else [])
    if fmt == "markdown":
        out = render_markdown(groups, keys, metrics)
    elif fmt == "csv":
        out = render_csv(groups, keys, metrics)
    else:
        title = f"{root}: {len(runs)} runs in {len(groups)} configs, best {METRIC_TITLES.get(sort_by, sort_by)} first"
        out = render_table(groups, keys, metrics, title)
    if plot is not None:
        try:
            plot_accuracy(groups, keys, plot)
        except ImportError:
            raise ClrunError("--plot needs matplotlib: pip install matplotlib (or the 'logging' extra).") from None
    notes = [f"unreadable results file (skipped): {p}" for p in unreadable]
    missing = jobs_without_results(root, results_name)
    if missing:
        notes.append(f"{len(missing)} job folder(s) without {results_name} (failed, interrupted or "
                     f"running): " + ", ".join(p.name for p in missing[:5]) + (" ..." if len(missing) > 5 else ""))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="clrun-report",
        description="Group the runs under a folder by config (all keys that differ, except the seed) and "
                    "show the mean ± sample std (ddof=1) over seeds of avg_acc, forgetting and BWT, best first.")
    parser.add_argument("dir", type=Path, help="a multirun folder (or any folder holding results.json files)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="bar chart of the average accuracy per config")
    parser.add_argument("--sort-by", choices=list(OBJECTIVES), default="avg_acc",
                        help="metric that orders the configs, best first (default avg_acc)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a config key (and the keys under it) that does not define a group; repeatable")
    parser.add_argument("--results-name", default="results.json", help="name of the results files")
    args = parser.parse_args(argv)
    from cl_runner.errors import ClrunError

    try:
        out = report(args.dir, args.format, args.sort_by, args.ignore, args.results_name, args.plot)
    except ClrunError as ex:
        print(f"error: {ex}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(out)
    if args.plot is not None:
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
