#!/usr/bin/env python
"""Time clrun's reference experiment against a minimal hand-written loop, in one run.

Reference experiment: Rotated MNIST, 20 tasks, 9 degrees per task, full 60k/10k per task,
MLP 2x256 dropout 0.2, SGD lr 0.01 momentum 0.8, batch 10, 1 epoch per task, full accuracy
matrix after every task.

Rows (PyTorch backend, CPU):
  torch naive : clrun algo=naive           vs a hand-written eager loop doing the same steps
                                              and evaluations on the same tensors
  torch ewc   : clrun algo=ewc             vs the same hand-written loop plus a textbook EWC
                                              (the penalty one autograd term built from the
                                              running sums of F and F*theta*, vmap per-sample
                                              Fisher)
Rows (JAX backend, CPU):
  jax naive   : clrun backend=jax algo=naive vs a minimal hand-written jit + lax.scan loop
                                              (one compiled program per epoch, jitted evaluation)
  jax ewc     : clrun backend=jax algo=ewc  vs the same loop plus a textbook EWC (autograd
                                              penalty, vmap per-sample Fisher)
  jax x5 seeds: clrun backend=jax algo=naive seeds=[0,1,2,3,4] (the five seeds trained together,
                one program per epoch and CPU device) vs clrun backend=jax algo=naive seed=0
                (one seed); a ratio below 5 is what training the seeds together saves over
                running them in turn.
                With --quick the rows are naive's only (--algos naive,ewc adds EWC's); with
                --algos ewc the seeds row is EWC x5 against the jax ewc row's one seed.
Rows on a GPU (--cases gpu; in the default run where PyTorch or JAX sees a GPU, JAX through
jax[cuda12]), each device=cuda:
  gpu torch ALGO : clrun algo=ALGO vs the hand-written eager loop on the GPU (target: the full
                   reference with EWC in at most 30 s)
  gpu jax ALGO   : clrun backend=jax algo=ALGO vs the hand-written jit + lax.scan loop on the GPU
                   (target: at most 10 s)
  gpu jax x10 seeds: ten seeds trained together (one vmapped program) vs the gpu jax row's one
                   seed (target: at most 2x)
Data rows: building the 20 rotated tasks from the IDX files, and loading them from the cache.

    python scripts/bench.py --data-dir ../shared/data            # full reference (10-50 min)
    python scripts/bench.py --data-dir ../shared/data --quick    # 3 tasks x 10k, naive rows (< 1 min)
    python scripts/bench.py --algorithms                         # steps/s of every algorithm vs naive
    python scripts/bench.py --data-dir ../shared/data --cases gpu --algos ewc   # the GPU rows only

``--algorithms``: every algorithm on both backends (``--backends torch`` for one) on a short
Rotated MNIST stream (3 tasks x 2,000 images, MLP 2x256, batch 10; each algorithm's defaults),
its training steps/s and the ratio to naive on the same backend (end-of-task work such as a
Fisher or a memory update is counted in the training time).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cl_runner.benchmarks import build_stream  # noqa: E402
from cl_runner.config import validate_config  # noqa: E402
from cl_runner.experiment import choose_threads, run_experiment  # noqa: E402


def reference_config(args, algo: str, backend: str = "torch", device: str = "cpu") -> dict:
    bench = {"name": "rotatedmnist", "num_tasks": args.tasks, "per_task_rotation": 9,
             "batch_size": 10, "eval_batch_size": 1000, "subset": args.subset}
    return {
        "seed": 0, "device": device, "data_dir": args.data_dir, "cache_dir": args.cache_dir,
        "progress": False, "benchmark": bench,
        "backbone": {"type": "mlp", "n_hidden_layers": 2, "width": 256, "dropout": 0.2},
        "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.8},
        "algo": {"name": algo},
        "backend": {"name": backend},
        "training": {"epochs_per_task": 1, "eval_initial": False},
    }


def time_clrun(args, algo: str, backend: str = "torch", device: str = "cpu", **extra) -> tuple[float, dict]:
    out = tempfile.mkdtemp(prefix=f"bench-{algo}-")
    from rich.console import Console

    cfg = {**reference_config(args, algo, backend, device), **extra}
    # Time the training and evaluation, not the files: the hand-written loops write none.
    cfg["loggers"], cfg["checkpoint"] = [], False
    t0 = time.perf_counter()
    results = run_experiment(cfg, out, console=Console(file=open(os.devnull, "w")))
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, results


def hand_written(args, ewc: bool, device: str = "cpu") -> tuple[float, float]:
    """The minimal loop a person would write: same stream, model, optimizer, steps, evals."""
    cfg, _ = validate_config(reference_config(args, "naive"))
    train_threads, eval_threads = choose_threads("auto", cfg.backbone, 10)
    if device != "cpu":
        train_threads = eval_threads = torch.get_num_threads()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    stream = build_stream(cfg.benchmark, 0, args.data_dir, args.cache_dir)
    mean, std = stream.mean[0], stream.std[0]

    def prep(x):  # a copy: x may be a read-only map
        return torch.from_numpy(np.array(x)).to(device).float().div_(255).sub_(mean).div_(std)

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.8)
    tests = [(prep(t.test_x), torch.from_numpy(np.array(t.test_y)).to(device)) for t in stream.tasks]
    # EWC's penalty sum_k F_k (theta - theta*_k)^2 / 2 as one autograd term from the running sums
    # sum_k F_k and sum_k F_k theta*_k (the constant sum_k F_k theta*_k^2 has no gradient): the
    # same steps as a term per past task, at the cost of one.
    fisher_sum, fisher_anchor, consolidated = None, None, False
    gen = torch.Generator().manual_seed(0)
    for task in stream.tasks:
        torch.set_num_threads(train_threads)
        x, y = prep(task.train_x), torch.from_numpy(np.array(task.train_y)).to(device)
        perm = torch.randperm(len(y), generator=gen).to(device)
        x, y = x[perm], y[perm]
        model.train()
        for lo in range(0, len(y), 10):
            loss = F.cross_entropy(model(x[lo:lo + 10]), y[lo:lo + 10])
            if consolidated:
                pen = sum((f * p * p).sum() - 2 * (fa * p).sum()
                          for f, fa, p in zip(fisher_sum, fisher_anchor, model.parameters()))
                loss = loss + 0.5 * pen
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ewc:
            from torch.func import functional_call, grad, vmap

            model.eval()
            params = {n: p.detach() for n, p in model.named_parameters()}

            def nll(p, xi, yi):
                return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

            g = vmap(grad(nll), in_dims=(None, 0, 0))
            fisher = {n: torch.zeros_like(p) for n, p in params.items()}
            for lo in range(0, 1024, 256):
                for n, v in g(params, x[lo:lo + 256], y[lo:lo + 256]).items():
                    fisher[n] += v.pow(2).sum(0)
            fk = [f / 1024 for f in fisher.values()]
            ak = [p.detach().clone() for p in model.parameters()]
            if not consolidated:
                fisher_sum, fisher_anchor = [torch.zeros_like(f) for f in fk], [torch.zeros_like(f) for f in fk]
            fisher_sum = [s + f for s, f in zip(fisher_sum, fk)]
            fisher_anchor = [s + f * a for s, f, a in zip(fisher_anchor, fk, ak)]
            consolidated = True
        torch.set_num_threads(eval_threads)
        model.eval()
        with torch.inference_mode():
            for tx, ty in tests:
                correct = sum(int((model(tx[lo:lo + 1000]).argmax(1) == ty[lo:lo + 1000]).sum())
                              for lo in range(0, len(ty), 1000))
    elapsed = time.perf_counter() - t0
    return elapsed, 100.0 * correct / len(ty)


def jax_hand_written(args, ewc: bool, device: str = "cpu") -> tuple[float, float]:
    """The minimal JAX loop a person would write: each epoch one jit + lax.scan over the batch
    indices of device-resident arrays, evaluation one jitted program per task."""
    import jax

    with jax.default_device(jax.devices("gpu" if device == "cuda" else "cpu")[0]):
        return _jax_hand_written(args, ewc)


def _jax_hand_written(args, ewc: bool) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import optax

    cfg, _ = validate_config(reference_config(args, "naive"))
    t0 = time.perf_counter()
    stream = build_stream(cfg.benchmark, 0, args.data_dir, args.cache_dir)
    mean, std = stream.mean[0], stream.std[0]

    def prep(x):  # the uint8 images to the device, converted there
        return (jnp.asarray(np.asarray(x)).reshape(len(x), -1).astype(jnp.float32) / 255.0 - mean) / std

    key = jax.random.PRNGKey(0)
    sizes = [784, 256, 256, 10]
    params = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / math.sqrt(n_in)
        params.append((jax.random.uniform(kw, (n_in, n_out), minval=-bound, maxval=bound),
                       jax.random.uniform(kb, (n_out,), minval=-bound, maxval=bound)))

    def forward(p, x, drop_key=None):
        for i, (w, b) in enumerate(p):
            x = x @ w + b
            if i < len(p) - 1:
                x = jax.nn.relu(x)
                if drop_key is not None:
                    keep = jax.random.bernoulli(jax.random.fold_in(drop_key, i), 0.8, x.shape)
                    x = jnp.where(keep, x / 0.8, 0.0)
        return x

    def nll(p, x, y, k=None):
        logits = forward(p, x, k)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])

    opt = optax.sgd(0.01, momentum=0.8)
    opt_state = opt.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    @jax.jit
    def epoch(params, opt_state, x, y, perm, k, fisher, anchor):
        def step(carry, idx):
            p, s, k = carry
            k, sub = jax.random.split(k)

            def loss(p):
                pen = sum(jnp.sum(f * (a - b) ** 2) for f, a, b in zip(jax.tree_util.tree_leaves(fisher),
                                                                       jax.tree_util.tree_leaves(p),
                                                                       jax.tree_util.tree_leaves(anchor)))
                return nll(p, x[idx], y[idx], sub) + 0.5 * pen

            g = jax.grad(loss)(p)
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s, k), None

        (params, opt_state, _), _ = jax.lax.scan(step, (params, opt_state, k), perm.reshape(-1, 10))
        return params, opt_state

    @jax.jit
    def correct(params, x, y):
        def batch(args):
            xb, yb = args
            return jnp.sum(jnp.argmax(forward(params, xb), -1) == yb)
        return jnp.sum(jax.lax.map(batch, (x.reshape(-1, 1000, 784), y.reshape(-1, 1000))))

    @jax.jit
    def fisher_of(params, x, y):
        g = jax.vmap(jax.grad(lambda p, xi, yi: nll(p, xi[None], yi[None])), in_axes=(None, 0, 0))(params, x, y)
        return jax.tree_util.tree_map(lambda v: jnp.mean(v ** 2, axis=0), g)

    tests = [(prep(t.test_x), jnp.asarray(np.asarray(t.test_y), jnp.int32)) for t in stream.tasks]
    fisher, anchor = zeros, zeros
    rng = np.random.default_rng(0)
    for task in stream.tasks:
        x, y = prep(task.train_x), jnp.asarray(np.asarray(task.train_y), jnp.int32)
        n = len(task.train_y) // 10 * 10
        perm = jnp.asarray(rng.permutation(len(task.train_y))[:n].astype(np.int32))
        key, sub = jax.random.split(key)
        params, opt_state = epoch(params, opt_state, x, y, perm, sub, fisher, anchor)
        if ewc:
            f = fisher_of(params, x[:1024], y[:1024])
            fisher = jax.tree_util.tree_map(jnp.add, fisher, f)  # summed over tasks, one anchor each
            anchor = params  # (textbook variant with the latest anchor; same arithmetic per step)
        accs = [int(correct(params, tx, ty)) for tx, ty in tests]
    elapsed = time.perf_counter() - t0
    return elapsed, 100.0 * accs[-1] / len(tests[-1][1])


def algorithm_speeds(args) -> list[dict]:
    """Training steps/s of every algorithm (its defaults) on each backend of ``--backends``, and x naive."""
    from cl_runner import catalog
    from cl_runner.registry import ALGORITHMS

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        catalog.load_backend(b)
    args.tasks, args.subset = 3, 2000
    out = []
    for backend in backends:
        naive = None
        for name in ["naive"] + sorted(n for n in ALGORITHMS.names() if n != "naive"):
            if backend not in ALGORITHMS.entry(name).backends:
                continue
            scen = ALGORITHMS.meta(name).get("scenarios") or ("domain_il",)
            extra = {"benchmark": {**reference_config(args, name)["benchmark"]}}
            if "domain_il" not in scen:  # e.g. iCaRL, KCL: Split MNIST in its first scenario
                extra["benchmark"] = {"name": "splitmnist", "scenario": scen[0], "batch_size": 10,
                                      "eval_batch_size": 1000, "subset": args.subset}
            if name == "kcl":
                extra["benchmark"] = {"name": "permutedmnist", "num_tasks": 3, "scenario": "task_il",
                                      "batch_size": 10, "eval_batch_size": 1000, "subset": args.subset}
            try:
                _, res = time_clrun(args, name, backend, loggers=[], checkpoint=False, **extra)
            except Exception as e:  # a method that cannot run here: say why, keep going
                out.append({"backend": backend, "algo": name, "error": f"{type(e).__name__}: {e}"[:120]})
                continue
            sps = res["steps_per_s"]
            naive = naive or sps
            out.append({"backend": backend, "algo": name, "steps_per_s": sps, "x_naive": sps / naive,
                        "avg_acc": res["avg_acc"]})
            print(f"{backend:<6} {name:<16} {sps:>9.0f} steps/s  {sps / naive:>6.2f} x naive", flush=True)
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_data(args) -> tuple[float, float, str]:
    """(seconds to build the reference stream and write it to an empty cache, seconds to load it
    from that cache, that cache's folder)."""
    cfg, _ = validate_config(reference_config(args, "naive"))
    tmp = tempfile.mkdtemp(prefix="bench-streams-")
    t0 = time.perf_counter()
    build_stream(cfg.benchmark, 0, args.data_dir, tmp)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = build_stream(cfg.benchmark, 0, args.data_dir, tmp)
    for t in s.tasks:  # touch every page, as a run does
        for part in (t.train_x, t.test_x):
            int(np.asarray(part).reshape(len(part), -1)[:, ::1024].sum())
    load = time.perf_counter() - t0
    return build, load, tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("CLRUN_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="3 tasks x 10k samples")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--algorithms", action="store_true", help="steps/s of every algorithm vs naive, on each of --backends")
    ap.add_argument("--backends", default="torch,jax",
                    help="with --algorithms: the backends to time, comma-separated (default: torch,jax)")
    ap.add_argument("--algos", default=None,
                    help="algorithms of the torch and jax rows, among naive, ewc (default: naive,ewc; "
                         "with --quick naive only)")
    ap.add_argument("--cases", default=None,
                    help="which rows to run, comma-separated among torch, jax, seeds, gpu (default: all; "
                         "gpu where a GPU is seen)")
    args = ap.parse_args()
    if args.algorithms:
        args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-streams-")
        rows = algorithm_speeds(args)
        print(f"\n{'backend':<7} {'algo':<16} {'steps/s':>9} {'x naive':>8} {'avg acc':>8}")
        for r in rows:
            if "error" in r:
                print(f"{r['backend']:<7} {r['algo']:<16} {r['error']}")
            else:
                print(f"{r['backend']:<7} {r['algo']:<16} {r['steps_per_s']:>9.0f} {r['x_naive']:>8.2f} "
                      f"{r['avg_acc']:>8.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    args.tasks, args.subset = (3, 10000) if args.quick else (20, None)
    if args.cases is None:
        args.cases = "torch,jax,seeds" + (",gpu" if gpus() else "")
    build_s, load_s, data_cache = time_data(args)
    if args.cache_dir is None:  # the timed runs read the stream just built
        args.cache_dir = data_cache
    else:
        build_stream(validate_config(reference_config(args, "naive"))[0].benchmark, 0, args.data_dir,
                     args.cache_dir)
    try:
        run_rows(ap, args, build_s, load_s)
    finally:
        shutil.rmtree(data_cache, ignore_errors=True)


def seeds_row(args, algo: str, n: int, device: str, one_s: float, res_one: dict, prefix: str) -> tuple:
    """The row of ``n`` seeds trained together against one seed (``one_s`` seconds)."""
    many, res = time_clrun(args, algo, "jax", device, seeds=list(range(n)))
    # Steps per seed as in the other rows; steps/s counts all seeds' steps.
    res = {**res, "steps": res_one["steps"], "steps_per_s": n * res_one["steps"] / many}
    name = f"{prefix} x{n} seeds" if algo == "naive" else f"{prefix} {algo} x{n} seeds"
    return name, many, one_s, res


@functools.lru_cache(maxsize=None)
def gpus() -> dict[str, str]:
    """The GPU each backend sees here, by backend ({} without one)."""
    found = {}
    if torch.cuda.is_available():
        found["torch"] = torch.cuda.get_device_name(0)
    try:
        from cl_runner import catalog

        catalog.load_backend("jax")  # first: it chooses the CPU devices before JAX starts
        import jax

        found["jax"] = jax.devices("gpu")[0].device_kind
    except Exception:  # no jax, or no GPU backend in it
        pass
    return found


#: The issue's GPU targets: end to end seconds of the reference experiment, and seeds x10 / x1.
GPU_TARGETS = {"torch": 30.0, "jax": 10.0, "seeds": 2.0}


def gpu_rows(args, algos: list[str], seeds_algo: str) -> list[tuple]:
    """On the GPU: clrun against the hand-written loops, and ten seeds together against one."""
    found = gpus()
    rows = []
    for backend in ("torch", "jax"):
        if backend not in found:
            print(f"(gpu rows: {backend} sees no GPU here, its rows are left out)")
            continue
        for algo in algos:
            base, _ = (hand_written if backend == "torch" else jax_hand_written)(args, algo == "ewc", "cuda")
            ours, res = time_clrun(args, algo, backend, "cuda")
            rows.append((f"gpu {backend} {algo}", ours, base, res))
            if backend == "jax" and algo == seeds_algo:
                one = (ours, res)
        if backend == "jax":
            rows.append(seeds_row(args, seeds_algo, 10, "cuda", *one, "gpu jax"))
    return rows


def run_rows(ap, args, build_s: float, load_s: float) -> None:
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = cases - {"torch", "jax", "seeds", "gpu"}
    if unknown:
        ap.error(f"--cases: unknown {sorted(unknown)}; choose among torch, jax, seeds, gpu")
    if "gpu" in cases and not gpus():
        ap.error("--cases gpu: neither PyTorch nor JAX sees a GPU here (JAX needs jax[cuda12])")
    algos = [a.strip() for a in (args.algos or ("naive" if args.quick else "naive,ewc")).split(",") if a.strip()]
    if not algos or set(algos) - {"naive", "ewc"}:
        ap.error(f"--algos: choose among naive, ewc (got {args.algos})")
    # The seeds row vectorises naive when it is measured, else the reference algorithm.
    seeds_algo = "naive" if "naive" in algos else algos[0]
    rows = []
    if "torch" in cases:
        for algo in algos:
            base, _ = hand_written(args, ewc=algo == "ewc")
            ours, res = time_clrun(args, algo)
            rows.append((f"torch {algo}", ours, base, res))
    one_seed = {}
    for algo in algos:
        if "jax" in cases or ("seeds" in cases and algo == seeds_algo):
            one_seed[algo] = time_clrun(args, algo, "jax")
        if "jax" in cases:
            base, _ = jax_hand_written(args, ewc=algo == "ewc")
            rows.append((f"jax {algo}", *one_seed[algo][:1], base, one_seed[algo][1]))
    if "seeds" in cases:
        one_s, res_one = one_seed[seeds_algo]
        rows.append(seeds_row(args, seeds_algo, 5, "cpu", one_s, res_one, "jax"))
    if "gpu" in cases:
        rows += gpu_rows(args, algos, seeds_algo)

    steps = rows[0][3]["steps"] if rows else 0
    print(f"\nreference: rotatedmnist {args.tasks} tasks x {args.subset or 60000} samples, "
          f"{steps} steps, batch 10, MLP 2x256; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__}"
          + "".join(f"; {b} GPU: {name}" for b, name in gpus().items() if "gpu" in cases))
    print(f"{'case':<18} {'clrun s':>9} {'baseline s':>11} {'ratio':>7} {'steps/s':>9} {'avg acc':>8}")
    table = []
    for name, ours, base, res in rows:
        print(f"{name:<18} {ours:>9.1f} {base:>11.1f} {ours / base:>7.2f} {res['steps_per_s']:>9.0f} "
              f"{res['avg_acc']:>8.2f}")
        table.append({"case": name, "clrun_s": ours, "baseline_s": base, "ratio": ours / base,
                      "steps_per_s": res["steps_per_s"], "avg_acc": res["avg_acc"]})
    if any(row["case"].endswith(" seeds") for row in table):
        print("(xN seeds: 'clrun s' is the N seeds trained together, 'baseline s' one seed alone, "
              "steps/s counts every seed's steps, avg acc is the mean over the seeds)")
    if any(row["case"].startswith("gpu ") for row in table):
        print(f"(gpu targets: torch at most {GPU_TARGETS['torch']:.0f} s and jax at most {GPU_TARGETS['jax']:.0f} s "
              f"end to end for the full reference; x10 seeds at most {GPU_TARGETS['seeds']:.0f}x one seed)")
    print(f"{'data build':<18} {build_s:>9.1f}")
    print(f"{'data cached':<18} {load_s:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "data_build_s": build_s,
                                               "data_cached_s": load_s, "quick": args.quick}, indent=2))


if __name__ == "__main__":
    main()
