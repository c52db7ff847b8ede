#!/usr/bin/env python
"""Each kernel path side by side on the reference experiment, with the ratios that decide the
defaults: is a hand-written C kernel (compiled at run time by the system's compiler) worth
keeping over the library paths that need no compiler?

Update paths (``backend.update_path``, cl_runner/backends/torch/update.py): c (native_sgd.c),
numba, compile (torch.compile; TorchInductor needs a C++ compiler on a CPU), fused
(torch._fused_sgd_), foreach (torch._foreach ops). Gather paths (``$CLRUN_GATHER``,
cl_runner/benchmarks/pixels.py): c (gather.c), torch (torch.index_select), numpy (np.take).

Rows:
  update PATH  clrun's torch EWC on the reference experiment (Rotated MNIST, 20 tasks x 60k,
               MLP 2x256 dropout 0.2, SGD lr 0.01 momentum 0.8, batch 10, 1 epoch per task,
               full accuracy matrix after every task; docs/PERFORMANCE.md) end to end with that
               update path (median of --repeat runs, the paths interleaved so that the machine's
               drift falls on all of them), plus the update alone: microseconds per call on the
               MLP's parameters with EWC's penalty active (median of 2,000 calls after warm-up)
  gather PATH  gathering the 20 rotated tasks from the cached stream's plan (what loading the
               cached reference stream does), every core, median of --repeat
The decision rule printed at the end: keep a hand-written kernel as the default only where it
beats the best path that needs no compiler (numba, fused, foreach; torch or numpy for the
gather) by more than 1.2x on the reference experiment's end-to-end time (for the gather: the
fastest end-to-end run with its gather replaced by the best library gather's time); the switch
is update.AUTO_ORDER / pixels.AUTO_ORDER.

    python scripts/bench_kernels.py --data-dir ../shared/data              # full reference (~6 runs of 1-3 min each per repeat)
    python scripts/bench_kernels.py --data-dir ../shared/data --quick      # 3 tasks x 10k samples, a minute or two
    python scripts/bench_kernels.py --data-dir ../shared/data --paths c,fused --gather-paths c,torch --repeat 3

Run it on an otherwise idle machine: every row is a wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

import bench  # noqa: E402  (scripts/bench.py: the reference config, time_clrun, cpu_model)
from cl_runner import catalog  # noqa: E402
from cl_runner.benchmarks import build_stream, pixels  # noqa: E402
from cl_runner.config import validate_config  # noqa: E402
from cl_runner.utils import cbuild  # noqa: E402

catalog.load_backend("torch")
from cl_runner.backends.torch import update  # noqa: E402

#: Paths that need no compiler on the machine that runs clrun.
NO_COMPILER = {"numba", "fused", "foreach", "torch", "numpy"}
THRESHOLD = 1.2


def isolated_update_us(path: str, calls: int = 2000) -> float | None:
    """Median microseconds of one update on the MLP 2x256's parameters, EWC's penalty active."""
    from cl_runner.backends.torch.fused import sgd_step
    from cl_runner.backends.torch.regularization import ImportanceRegularizer

    class Penalty(ImportanceRegularizer):
        def __init__(self, params):
            self.params = params
            self.omega = [torch.rand_like(p) for p in params]
            self.omega_anchor = [torch.randn_like(p) for p in params]
            self.num_snapshots = 1

        @property
        def strength(self):
            return 50.0

    torch.manual_seed(0)
    shapes = [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,)]
    params = [(torch.randn(s) * 0.01).requires_grad_() for s in shapes]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.8)
    penalty = Penalty(params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    penalty.after_backward()
    sgd_step(opt)  # creates the momentum buffers
    if path == "foreach":
        def step():
            penalty.after_backward()
            sgd_step(opt)
    else:
        step_obj, _ = update.for_learner(path, opt, [penalty], None, True, True)
        step = step_obj
    times = []
    with torch.no_grad():
        for i in range(calls + 200):
            for p in params:  # a new gradient every step, as in training
                p.grad = torch.empty_like(p).normal_(0, 1e-3)
            t0 = time.perf_counter()
            step()
            if i >= 200:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def end_to_end(args, path: str) -> tuple[float, dict]:
    """clrun's EWC on the reference stream with update ``path``: (seconds, results), timed as
    bench.py times clrun (no loggers or checkpoints: the training and the evaluations)."""
    from rich.console import Console

    from cl_runner.experiment import run_experiment

    cfg = bench.reference_config(args, "ewc")
    cfg["backend"] = {"name": "torch", "update_path": path}
    cfg["loggers"], cfg["checkpoint"] = [], False
    out = tempfile.mkdtemp(prefix=f"bench-kernels-{path}-")
    try:
        t0 = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            results = run_experiment(cfg, out, console=Console(file=devnull))
        return time.perf_counter() - t0, results
    finally:
        shutil.rmtree(out, ignore_errors=True)


def gather_seconds(plan, path: str) -> float:
    gathers = list(plan.parts.values())
    t0 = time.perf_counter()
    pixels.gather_all(plan.bases, gathers, path=path)
    return time.perf_counter() - t0


def decide(kind: str, rows: dict[str, float], handwritten: str = "c") -> str:
    """The rule's verdict for one kernel from its paths' times (seconds, lower is better)."""
    library = {p: s for p, s in rows.items() if p in NO_COMPILER}
    if handwritten not in rows or not library:
        return f"{kind}: not enough paths measured to decide"
    best = min(library, key=library.get)
    ratio = library[best] / rows[handwritten]
    keep = ratio > THRESHOLD
    order = (handwritten, best) if keep else (best,)
    fallback = "foreach" if kind == "update" else "numpy"
    order = tuple(dict.fromkeys([*order, fallback]))
    return (f"{kind}: {handwritten} is {ratio:.2f}x faster than the best path without a compiler "
            f"({best}) -> {'keep' if keep else 'drop'} it as the default "
            f"(AUTO_ORDER = {order!r})")


def decide_gather(gathers: dict[str, float], end_to_end_s: float | None, handwritten: str = "c") -> str:
    """The rule's verdict for the gather, on the reference experiment's end-to-end time: every
    end-to-end run loaded the cached stream with the hand-written gather, so with the best
    library gather it would have taken ``end_to_end_s - gathers[c] + gathers[best]``."""
    library = {p: s for p, s in gathers.items() if p in NO_COMPILER}
    if handwritten not in gathers or not library:
        return "gather: not enough paths measured to decide"
    if end_to_end_s is None:
        return decide("gather", gathers) + " [the gather alone: no end-to-end run to weigh it against]"
    best = min(library, key=library.get)
    alone = library[best] / gathers[handwritten]
    ratio = (end_to_end_s - gathers[handwritten] + library[best]) / end_to_end_s
    keep = ratio > THRESHOLD
    order = tuple(dict.fromkeys([*((handwritten, best) if keep else (best,)), "numpy"]))
    return (f"gather: {handwritten} is {alone:.2f}x faster than {best} alone, {ratio:.3f}x on the reference "
            f"experiment end to end ({end_to_end_s:.1f} s) -> {'keep' if keep else 'drop'} it as the default "
            f"(AUTO_ORDER = {order!r})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("CLRUN_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="3 tasks x 10k samples")
    ap.add_argument("--paths", default=",".join(update.PATHS), help="update paths (default: all)")
    ap.add_argument("--gather-paths", default=",".join(pixels.PATHS), help="gather paths (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path (the median is shown)")
    ap.add_argument("--no-end-to-end", action="store_true", help="only the isolated update and the gathers")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    args.tasks, args.subset = (3, 10000) if args.quick else (20, None)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    gather_paths = [p.strip() for p in args.gather_paths.split(",") if p.strip()]
    for p in paths:
        if p not in update.PATHS:
            ap.error(f"--paths: {p} is not one of {', '.join(update.PATHS)}")
    for p in gather_paths:
        if p not in pixels.PATHS:
            ap.error(f"--gather-paths: {p} is not one of {', '.join(pixels.PATHS)}")
    unavailable = {p: update.unavailable_reason(p) for p in paths if update.unavailable_reason(p)}
    if "c" in gather_paths and pixels.unavailable_reason():
        gather_paths.remove("c")
        print(f"gather c: unavailable ({pixels.unavailable_reason()})")
    for p, why in unavailable.items():
        print(f"update {p}: unavailable ({why})")
    paths = [p for p in paths if p not in unavailable]

    own_cache = args.cache_dir is None
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-kernels-")
    cfg, _ = validate_config(bench.reference_config(args, "ewc"))
    stream = build_stream(cfg.benchmark, 0, args.data_dir, args.cache_dir)  # builds and caches it
    stream = build_stream(cfg.benchmark, 0, args.data_dir, args.cache_dir)  # the cached stream's plan
    plan = stream.plan
    table: dict = {"update": {}, "gather": {}}
    try:
        micro = {p: isolated_update_us(p) for p in paths}
        e2e: dict[str, list[float]] = {p: [] for p in paths}
        results: dict[str, dict] = {}
        gather: dict[str, list[float]] = {p: [] for p in gather_paths}
        for r in range(max(1, args.repeat)):
            shift = r % max(1, len(paths))
            for p in (paths[shift:] + paths[:shift]) if not args.no_end_to_end else []:
                seconds, res = end_to_end(args, p)
                e2e[p].append(seconds)
                results[p] = res
                print(f"  update {p:<8} {seconds:7.1f} s  ({res['kernels']['update']['steps']})", flush=True)
            gshift = r % max(1, len(gather_paths))
            for p in gather_paths[gshift:] + gather_paths[:gshift]:
                gather[p].append(gather_seconds(plan, p))
    finally:
        if own_cache:
            shutil.rmtree(args.cache_dir, ignore_errors=True)

    steps = next(iter(results.values()))["steps"] if results else 0
    print(f"\nreference: rotatedmnist {args.tasks} tasks x {args.subset or 60000} samples, {steps} steps, batch 10, "
          f"MLP 2x256, EWC; {platform.machine()}, {os.cpu_count()} cores ({bench.cpu_model()}), "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"numba {_version('numba')}, C compiler {cbuild.describe(cbuild.compiler())}; repeats {args.repeat}")
    medians = {p: statistics.median(v) for p, v in e2e.items() if v}
    best_lib = min((s for p, s in medians.items() if p in NO_COMPILER), default=None)
    print(f"{'update path':<14} {'clrun s':>9} {'x best lib':>11} {'update us':>10} {'steps/s':>9} {'avg acc':>8}")
    for p in paths:
        s = medians.get(p)
        res = results.get(p, {})
        ratio = f"{best_lib / s:>11.2f}" if s and best_lib else f"{'-':>11}"
        print(f"{p:<14} {s if s else float('nan'):>9.1f} {ratio} {micro[p]:>10.1f} "
              f"{res.get('steps_per_s', float('nan')):>9.0f} {res.get('avg_acc', float('nan')):>8.2f}")
        table["update"][p] = {"clrun_s": e2e[p], "median_s": s, "update_us": micro[p],
                              "steps_per_s": res.get("steps_per_s"), "avg_acc": res.get("avg_acc")}
    gmed = {p: statistics.median(v) for p, v in gather.items() if v}
    best_g = min((s for p, s in gmed.items() if p in NO_COMPILER), default=None)
    print(f"{'gather path':<14} {'20 tasks s' if not args.quick else '3 tasks s':>10} {'x best lib':>11}")
    for p, s in gmed.items():
        print(f"{p:<14} {s:>10.2f} {best_g / s if best_g else float('nan'):>11.2f}")
        table["gather"][p] = {"seconds": gather[p], "median_s": s}
    print("('x best lib': the best time among the paths without a compiler divided by this path's; "
          f"above {THRESHOLD} a hand-written kernel is worth keeping)")
    if medians:
        print(decide("update", medians))
    else:
        print(decide("update", micro) + " [isolated update only]")
    print(decide_gather(gmed, min(medians.values()) if medians else None))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    main()
