"""Run the experiment files of ``expected_results/`` and compare them with the published numbers.

Each file holds one published number (``expected.value``, ``tolerance``, ``seeds``, ``source``,
``tier``). This script runs every selected file once per seed (seeds 0 .. seeds-1) with plain
``clrun +expected=<name> seed=<s>``, several runs side by side, averages the metric over the
seeds, writes a table to docs/RESULTS.md and exits with status 1 when a case falls outside its
tolerance (a case marked ``known_gap`` is reported with its analysis but does not fail the run).

    clrun-regress --tier ci                  # the CI tier
    clrun-regress 'der_seqmnist_*' --jobs 2  # a glob of names
    clrun-regress --tier ci --max-seeds 3    # at most 3 seeds per case (said in the report)
    clrun-regress der_seqmnist_sgd -- device=cuda   # clrun overrides for every run
    clrun-regress --dir my_numbers           # your own folder of experiment files, every tier

``python -m cl_runner.regress`` and, in a checkout, ``python scripts/regress.py`` are the same
tool. The data directory comes from --data-dir, else $CLRUN_DATA_DIR, else clrun's default.
The report goes to docs/RESULTS.md when clrun's own files run from a checkout, else to
RESULTS.md in the working directory (--out chooses). Paths in the report are written relative to
the checkout (or the working directory), so it names no folder of the machine that ran it.

With ``--dir``, the files of that folder are the cases, and each run finds its file through
$CLRUN_EXPECTED_DIRS (:func:`cl_runner.sweeps.expected_dirs`), as ``clrun +expected=<name>``
does for a user who sets it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cl_runner import resources
from cl_runner.sweeps import EXPECTED_DIRS_ENV, usable_cores

REPO = resources.checkout_dir()  # None for an installed wheel
EXPECTED_DIR = resources.EXPECTED_DIR
TIERS = ("ci", "cpu", "gpu")
# Options whose value is a path: shown relative to the checkout (or as given) in the report.
PATH_OPTIONS = ("--data-dir", "--out", "--workdir", "--dir")


@dataclass
class Case:
    name: str
    path: Path
    metric: str
    value: float
    tolerance: float
    seeds: int
    source: str
    tier: str
    known_gap: str | None
    runs: list[dict] = field(default_factory=list)   # one per seed: seed, value, seconds, error
    seeds_run: int = 0

    @property
    def measured(self) -> list[float]:
        return [r["value"] for r in self.runs if r.get("value") is not None]

    @property
    def errors(self) -> list[str]:
        return [f"seed {r['seed']}: {r['error']}" for r in self.runs if r.get("error")]

    def mean_std(self) -> tuple[float | None, float | None]:
        vals = self.measured
        if not vals:
            return None, None
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return mean, std

    @property
    def status(self) -> str:
        mean, _ = self.mean_std()
        if self.errors or mean is None:
            return "ERROR"
        if abs(mean - self.value) <= self.tolerance:
            return "PASS"
        return "KNOWN GAP" if self.known_gap else "FAIL"


def load_cases(directory: Path | None = None) -> list[Case]:
    """The experiment files of ``directory`` (default: clrun's own, expected_results/)."""
    from omegaconf import OmegaConf

    cases = []
    for path in sorted(Path(directory or EXPECTED_DIR).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        exp = node.get("expected") or {}
        if exp.get("value") is None:
            raise SystemExit(f"{path}: no expected.value; every experiment file states its published number.")
        cases.append(Case(name=path.stem, path=path, metric=exp.get("metric", "avg_acc"),
                          value=float(exp["value"]), tolerance=float(exp.get("tolerance", 3.0)),
                          seeds=int(exp.get("seeds", 1)), source=str(exp.get("source", "")),
                          tier=str(exp.get("tier", "ci")), known_gap=exp.get("known_gap")))
    return cases


def select(cases: list[Case], tier: str | None, patterns: list[str]) -> list[Case]:
    chosen = [c for c in cases if tier in (None, "all") or c.tier == tier]
    if patterns:
        chosen = [c for c in chosen if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    return chosen


def run_seeds(case: Case, seeds: list[int], workdir: Path, args, threads: int) -> list[dict]:
    """Run ``seeds`` of one case in one ``clrun -m`` process (Hydra runs the jobs one after the
    other in that process, so the interpreter, torch and the config are loaded once). Each seed
    writes ``<workdir>/<case>/seed_<s>/results.json``; returns one record per seed."""
    out = workdir / case.name
    cmd = [sys.executable, "-m", "cl_runner.cli", "-m", f"+expected={case.name}",
           f"seed={','.join(str(s) for s in seeds)}", f"hydra.sweep.dir={out}",
           "hydra.sweep.subdir=seed_${seed}", "progress=false", "loggers=[]", "checkpoint=false",
           f"threads={threads}"]
    if args.data_dir:
        cmd.append(f"data_dir={Path(args.data_dir).expanduser().resolve()}")
    if args.backend:
        cmd.append(f"backend={args.backend}")
    cmd += args.override
    begin = time.perf_counter()
    env = None
    if args.dir:  # the user's folder, last: its files hide any of the same name
        before = [d for d in os.environ.get(EXPECTED_DIRS_ENV, "").split(os.pathsep) if d]
        env = {**os.environ, EXPECTED_DIRS_ENV: os.pathsep.join([*before, str(Path(args.dir).resolve())])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - begin
    records = []
    for seed in seeds:
        record = {"seed": seed, "seconds": 0.0, "value": None, "error": None}
        results = out / f"seed_{seed}" / "results.json"
        if not results.exists():
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines()
                     if ln.strip() and "HYDRA_FULL_ERROR" not in ln and "hydra.cc/docs" not in ln]
            record["error"] = f"exit {proc.returncode}: " + " | ".join(lines[-3:])
        else:
            data = json.loads(results.read_text())
            record.update(value=data.get(case.metric), steps_per_s=data.get("steps_per_s"),
                          seconds=float(data.get("total_time_s") or 0.0))
        records.append(record)
    # The process's own start (interpreter, imports, config) is shared out over its seeds.
    overhead = max(0.0, elapsed - sum(r["seconds"] for r in records)) / len(records)
    for r in records:
        r["seconds"] += overhead
    return records


def previous_minutes(path: Path) -> dict[str, float]:
    """Each case's ``minutes`` in an earlier report at ``path`` (for scheduling longest first)."""
    out = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in ("name", "---"):
            try:
                out[cells[0]] = float(cells[8])
            except ValueError:
                pass
    return out


def git_commit() -> str:
    """The checkout's commit (``+modified`` with uncommitted changes), else clrun's version."""
    import cl_runner

    if REPO is None:
        return f"clrun {cl_runner.__version__} (installed)"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=REPO, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return sha + ("+modified" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return f"clrun {cl_runner.__version__}"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def display_path(value: str, base: Path | None = None) -> str:
    """``value`` for the report: an absolute path inside the folder of ``base`` (default: the
    checkout, or installed, the working directory) relative to ``base``, anything else as given."""
    base = base or (REPO if REPO is not None else Path.cwd())
    path = Path(value).expanduser()
    if not path.is_absolute():
        return value
    rel = Path(os.path.relpath(path, base))
    return rel.as_posix() if not rel.as_posix().startswith("../..") else value


def display_argv(argv: list[str], base: Path | None = None) -> list[str]:
    """The command line with the values of :data:`PATH_OPTIONS` passed through :func:`display_path`."""
    out = []
    after = None
    for token in argv:
        if after is not None:
            out.append(display_path(token, base))
            after = None
            continue
        name, eq, value = token.partition("=")
        if name in PATH_OPTIONS and eq:
            out.append(f"{name}={display_path(value, base)}")
        else:
            out.append(token)
            after = name if token in PATH_OPTIONS else None
        if token == "--":
            out += argv[len(out):]
            break
    return out


def report(cases: list[Case], args, wall: float) -> str:
    import torch

    # a user's folder: paths relative to the working directory; clrun's own: to the checkout
    base = Path.cwd() if args.dir else None
    folder = display_path(str(Path(args.dir).resolve()), base) if args.dir else "expected_results"
    lines = ["# Published numbers, reproduced", "",
             "Generated by the regression tool, cl_runner/regress.py "
             f"(`{' '.join([args.prog] + display_argv(args.argv, base))}`). Each row runs the experiment "
             f"file `{folder}/<name>.yaml` with plain `clrun +expected=<name> seed=<s>` for "
             "seeds 0 .. n-1 (`clrun -m` over the seeds, one process per case) and averages the "
             "metric (percent).", "",
             f"- commit `{git_commit()}`, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, "
             f"{'GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
             f"python {platform.python_version()}, torch {torch.__version__}",
             f"- backend: {args.backend or 'as each file says (torch unless set)'}; "
             f"{args.jobs} runs side by side; wall time {wall / 60:.1f} min", ""]
    if args.max_seeds:
        lines += [f"Runs were capped at {args.max_seeds} seeds per case (`--max-seeds`); the "
                  "`seeds` column says how many of the published number's runs were averaged.", ""]
    lines += ["| name | metric | published | measured mean +- std | delta | tolerance | seeds | status | minutes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        mean, std = c.mean_std()
        delta = None if mean is None else mean - c.value
        minutes = sum(r["seconds"] for r in c.runs) / 60
        measured = "-" if mean is None else f"{mean:.2f} +- {std:.2f}"
        lines.append(f"| {c.name} | {c.metric} | {c.value:.2f} | {measured} | "
                     f"{'-' if delta is None else f'{delta:+.2f}'} | {c.tolerance:.2f} | "
                     f"{len(c.measured)}/{c.seeds} | {c.status} | {minutes:.1f} |")
    lines += ["", "`minutes`: the sum of the runs' times, each with its share of its process's start-up "
              "(runs of several cases share the machine).", ""]
    lines += ["## Sources", ""] + [f"- `{c.name}`: {c.source}" for c in cases]
    gaps = [c for c in cases if c.known_gap]
    if gaps:
        lines += ["", "## Known gaps", ""]
        lines += [f"- `{c.name}` ({c.status}): {c.known_gap.strip()}" for c in gaps]
    errors = [c for c in cases if c.errors]
    if errors:
        lines += ["", "## Errors", ""]
        for c in errors:
            lines += [f"- `{c.name}`: {e}" for e in c.errors]
    notes = REPO / "docs" / "RESULTS_NOTES.md" if REPO is not None and not args.dir else None
    if notes is not None and notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def default_report(directory: str | None) -> Path:
    """docs/RESULTS.md for clrun's own files in a checkout; else RESULTS.md here."""
    if REPO is not None and not directory:
        return REPO / "docs" / "RESULTS.md"
    return Path("RESULTS.md")


def main(argv=None, prog: str = "clrun-regress") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="names or globs of experiment files (default: all of the tier)")
    p.add_argument("--tier", choices=(*TIERS, "all"), default=None,
                   help="run the files of this tier (default: all files when names are given, else ci)")
    p.add_argument("--jobs", type=int, default=usable_cores(), help="runs side by side")
    p.add_argument("--max-seeds", type=int, default=None, help="run at most this many seeds per case")
    p.add_argument("--backend", choices=("torch", "jax"), default=None, help="override each file's backend")
    p.add_argument("--data-dir", default=os.environ.get("CLRUN_DATA_DIR"))
    p.add_argument("--dir", default=None,
                   help="a folder of your own experiment files to run instead of clrun's (every tier "
                        "unless --tier says otherwise)")
    p.add_argument("--out", default=None,
                   help="the report (markdown; default docs/RESULTS.md in a checkout, else ./RESULTS.md)")
    p.add_argument("--workdir", default=None, help="where the runs' directories go (default: a temporary one)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.override = extra  # after --: clrun overrides added to every run
    args.prog, args.argv = prog, argv
    if args.dir and not Path(args.dir).is_dir():
        print(f"{prog}: --dir {args.dir}: no such folder (give the folder that holds your "
              f"experiment files, <name>.yaml)", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = str(default_report(args.dir))
    tier = args.tier if args.tier is not None else (None if args.names or args.dir else "ci")
    all_cases = load_cases(Path(args.dir) if args.dir else None)
    cases = select(all_cases, tier, args.names)
    if not cases:
        names = ", ".join(c.name for c in all_cases) or f"none in {args.dir or EXPECTED_DIR}"
        print(f"no experiment file matches (tier {tier}, names {args.names or 'any'}). Files: {names}",
              file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(f"{c.name:32s} {c.tier:4s} {c.metric} {c.value:.2f} +- {c.tolerance:.2f}  seeds {c.seeds}")
        return 0
    jobs = max(1, args.jobs)
    threads = max(1, usable_cores() // jobs)
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="clrun-regress-"))
    # One process per case runs its seeds one after another; when there are fewer cases than
    # jobs, a case's seeds are dealt out over several processes. The longest cases (by the
    # minutes of the previous report) start first, so no job idles at the end waiting on one.
    minutes = previous_minutes(Path(args.out))
    units = []
    for c in cases:
        c.seeds_run = min(c.seeds, args.max_seeds) if args.max_seeds else c.seeds
        chunks = max(1, min(c.seeds_run, jobs // len(cases)))
        units += [(c, list(range(k, c.seeds_run, chunks))) for k in range(chunks)]
    units.sort(key=lambda u: -minutes.get(u[0].name, float("inf")) * len(u[1]) / max(1, u[0].seeds_run))
    runs = sum(c.seeds_run for c in cases)
    print(f"{len(cases)} cases, {runs} runs in {len(units)} processes, {jobs} side by side, "
          f"runs in {workdir}", flush=True)
    start = time.perf_counter()

    def go(unit):
        c, seeds = unit
        for record in run_seeds(c, seeds, workdir, args, threads):
            c.runs.append(record)
            shown = record["error"] or f"{c.metric} {fmt(record['value'])}"
            print(f"  {c.name} seed {record['seed']}: {shown} ({record['seconds']:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(go, units))
    wall = time.perf_counter() - start
    for c in cases:
        c.runs.sort(key=lambda r: r["seed"])
    text = report(cases, args, wall)
    write_atomic(Path(args.out), text)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for c in cases:
        mean, std = c.mean_std()
        print(f"{c.status:9s} {c.name:32s} published {c.value:6.2f}  measured {fmt(mean)} +- {fmt(std)}"
              f"  (tolerance {c.tolerance:.2f}, {len(c.measured)} seeds)")
    print(f"report: {args.out}  ({wall / 60:.1f} min)")
    bad = [c for c in cases if c.status in ("FAIL", "ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
