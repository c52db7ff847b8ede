"""On the real MNIST: replay methods beat fine-tuning by a wide margin on class-IL Split MNIST,
the regularisers (and A-GEM) beat it on Permuted MNIST, LwF forgets less in task-IL.

Every run: 5 tasks, 1 epoch, batch 10, an MLP with two hidden layers of 100 units, SGD, seed 0.
Hyperparameters are the papers' where they fit this setting; where not, the comment says why.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from cl_runner.experiment import run_experiment

pytestmark = pytest.mark.slow


def run(data_dir, out, benchmark: str, algo: str, lr: float, subset: int, scenario=None, **algo_keys) -> dict:
    cfg = {
        "seed": 0, "data_dir": str(data_dir), "progress": False, "loggers": [], "checkpoint": False,
        "threads": 1,
        "algo": {"name": algo, **algo_keys},
        "benchmark": {"name": benchmark, "num_tasks": 5, "subset": subset, "test_subset": 1000,
                      "batch_size": 10, "eval_batch_size": 1000,
                      **({"scenario": scenario} if scenario else {})},
        "backbone": {"type": "mlp", "n_hidden_layers": 2, "width": 100},
        "optimizer": {"type": "sgd", "lr": lr},
        "training": {"epochs_per_task": 1},
    }
    res = run_experiment(cfg, out, console=Console(file=io.StringIO()))
    assert np.asarray(res["acc_matrix"]).shape == (5, 5)
    return res


# -- class-IL Split MNIST: replay -----------------------------------------------------------------
# The DER paper's seq-MNIST protocol (1 epoch, batch 10, MLP 2x100, lr 0.03, memory batch = batch
# size, buffer 200 with its alpha/beta), on 1000 training images per task.
SPLIT = dict(benchmark="splitmnist", lr=0.03, subset=1000)


@pytest.fixture(scope="module")
def split_naive(shared_data_dir, tmp_path_factory):
    return run(shared_data_dir, tmp_path_factory.mktemp("split-naive"), algo="naive", **SPLIT)


# Measured (seeds 0, 1, 2): naive 19.3 / 19.1 / 19.3 (only the last task is right);
# ER 77.4 / 74.2 / 79.8, DER 60.6 / 54.7 / 63.9, DER++ 81.1 / 80.7 / 82.5. (DER gains most from
# longer tasks: its stored logits come from a network still learning the task; with 6000 images
# per task, seed 0: ER 77.0, DER 81.2, DER++ 82.3, the paper's order.)
@pytest.mark.parametrize("algo", ["er", "der", "derpp"])
def test_replay_beats_naive_on_class_il_split_mnist(shared_data_dir, tmp_path, split_naive, algo):
    res = run(shared_data_dir, tmp_path, algo=algo, **SPLIT)
    assert split_naive["avg_acc"] < 25  # class-IL fine-tuning forgets everything but the last task
    assert res["avg_acc"] > split_naive["avg_acc"] + 30, (split_naive["avg_acc"], res["avg_acc"])
    assert res["forgetting"] < split_naive["forgetting"] - 30
    R = np.asarray(res["acc_matrix"])
    assert R[-1, 0] > 30  # the first task is still recognised after four more


# -- Permuted MNIST (domain-IL): regularisers and A-GEM -----------------------------------------------
# lr 0.1 with batch 10 and one epoch is the A-GEM paper's Permuted MNIST setting for SI, MAS and
# A-GEM. EWC and online EWC use that paper's lambda = 10 (with 100, lr * lambda * F passes the
# stability limit of explicit steps and the loss diverges). SI uses Zenke et al.'s c = 0.1,
# xi = 0.1. MAS: the paper's lambda = 1 over-regularises here (each task is learnt to ~70%
# instead of 85%, and with lr 0.1 it diverges); the importances are the squared L2 norm's
# gradients summed over 10 outputs, so lambda = 0.03 is used.
PERMUTED = dict(benchmark="permutedmnist", lr=0.1, subset=2000)


@pytest.fixture(scope="module")
def permuted_naive(shared_data_dir, tmp_path_factory):
    return run(shared_data_dir, tmp_path_factory.mktemp("permuted-naive"), algo="naive", **PERMUTED)


# Measured average accuracy (seeds 0, 1, 2): naive 76.8 / 77.3 / 78.2; EWC 84.5 / 82.2 / 84.7;
# online EWC 84.5 / 79.7 / 83.4; SI 83.2 / 80.6 / 84.4; MAS 82.9 / 79.8 / 82.7;
# A-GEM 85.7 / 83.3 / 84.4. Forgetting: naive 11.3 (seed 0), the others 1.8-4.1.
@pytest.mark.parametrize("algo, keys", [
    ("ewc", {"ewc_lambda": 10.0}),
    ("ewc_online", {"ewc_lambda": 10.0, "ewc_gamma": 1.0}),
    ("si", {"si_c": 0.1, "si_xi": 0.1}),
    ("mas", {"mas_lambda": 0.03}),
    ("agem", {}),
], ids=["ewc", "ewc_online", "si", "mas", "agem"])
def test_method_beats_naive_on_permuted_mnist(shared_data_dir, tmp_path, permuted_naive, algo, keys):
    res = run(shared_data_dir, tmp_path, algo=algo, **PERMUTED, **keys)
    assert res["avg_acc"] > permuted_naive["avg_acc"] + 3, (permuted_naive["avg_acc"], res["avg_acc"])
    assert res["forgetting"] < permuted_naive["forgetting"] - 3, (permuted_naive["forgetting"], res["forgetting"])
    assert np.diag(res["acc_matrix"]).min() > 75  # each task is still learnt


# -- task-IL Split MNIST: LwF -----------------------------------------------------------------------
# Measured (seeds 0, 1): naive 96.2 / 93.2 average, forgetting 2.6 / 4.5; LwF (alpha 1, T 2,
# the paper's) 97.6 / 95.0, forgetting 0.7 / 2.4. (In class-IL LwF stays at naive's ~19%, as the
# DER paper also reports: distilling old logits cannot keep their classes competitive.)
def test_lwf_forgets_less_than_naive_in_task_il(shared_data_dir, tmp_path):
    naive = run(shared_data_dir, tmp_path / "naive", algo="naive", scenario="task_il", **SPLIT)
    lwf = run(shared_data_dir, tmp_path / "lwf", algo="lwf", scenario="task_il", **SPLIT)
    assert lwf["forgetting"] < naive["forgetting"] - 1, (naive["forgetting"], lwf["forgetting"])
    assert lwf["avg_acc"] > naive["avg_acc"], (naive["avg_acc"], lwf["avg_acc"])
