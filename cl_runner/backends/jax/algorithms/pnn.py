"""Progressive Neural Networks (Rusu et al. 2016, arXiv:1606.04671) on the JAX backend.

The network is the PyTorch backend's (``cl_runner/backends/torch/algorithms/pnn.py``): one MLP
column per task; column k's hidden layer i (i >= 1) and its output layer add a lateral input
from the earlier columns' previous-layer activations (concatenated), ``lateral=adapter``:
U sigma(V (alpha h)) with a learned scalar alpha (initialised U(0, 0.1)), a projection V (with
bias) onto the column's width and lateral weights U (no bias); ``lateral=linear``: U h;
``lateral_from_input`` adds such a map from the input to the first hidden layer and
``lateral_bias`` a bias per earlier column (A-GEM's PNN). Earlier
columns are frozen (and compute without dropout) while a task trains, so forgetting is zero;
the task id picks the column (training: the current task's; evaluation: the evaluated task's,
or the newest column for a task not trained yet).

Shapes that grow would recompile every task, so all ``num_tasks`` columns are allocated up front
(drawn from ``backbone.init``'s distributions, PyTorch's U(+-1/sqrt(fan_in)) by default) and
the active column is a traced integer in the part's state. The forward pass is a ``lax.switch``
over the column index whose branch k computes columns 0..k only, so a step costs what it costs
on PyTorch (k + 1 columns), and the epoch stays one compiled program for every task. After each
optimizer step every column but the active one keeps its values (the gradient reaches the
frozen earlier columns through the laterals; the optimizer must not move them, nor apply weight
decay to the columns of later tasks); the optimizer state is fresh at each new task, as PyTorch's
optimizer is rebuilt over the new column.

Not supported (clear errors, as on PyTorch where it applies): backbones other than an MLP with at
least one hidden layer, growing heads, and plugins (the columns are not the backbone parameter
tree other parts expect).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.backends.jax.backbones import truncated_normal
from cl_runner.backends.jax.learner import JaxLearner, Part
from cl_runner.backends.jax.memory import derived_seed
from cl_runner.backends.jax.optim import set_lr
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

tmap = jax.tree_util.tree_map
#: backbone.init=truncated_normal (A-GEM's weight_variable / bias_variable, model/model.py:24-60).
TRUNC_STD, TRUNC_BIAS = 0.1, 0.1


def _uniform(rng, fan_in: int, shape):
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _dense(rng, fan_in: int, fan_out: int, bias: bool = True, init: str = "default") -> dict:
    """A linear map's kernel (and bias) from ``backbone.init``'s distribution (as PyTorch's
    ``init_column`` draws them on the other backend)."""
    if init == "default":
        out = {"kernel": _uniform(rng, fan_in, (fan_in, fan_out))}
        if bias:
            out["bias"] = _uniform(rng, fan_in, (fan_out,))
        return out
    if init == "truncated_normal":
        kernel = truncated_normal(rng, TRUNC_STD, (fan_in, fan_out))
    elif init == "xavier_uniform":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-bound, bound, (fan_in, fan_out))
    else:  # kaiming_normal
        kernel = rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out))
    out = {"kernel": kernel.astype(np.float32)}
    if bias:
        out["bias"] = np.full((fan_out,), TRUNC_BIAS if init == "truncated_normal" else 0.0, np.float32)
    return out


def _lateral_params(rng, k: int, fan: int, fan_out: int, width: int, lateral: str, bias: bool, init: str) -> dict:
    """A lateral map from ``k`` earlier columns of ``fan`` units each."""
    if lateral == "adapter":
        p = {"alpha": rng.uniform(0.0, 0.1, ()).astype(np.float32),
             "project": _dense(rng, k * fan, width, init=init),
             "out": _dense(rng, width, fan_out, bias=False, init=init)}
    else:
        p = {"out": _dense(rng, k * fan, fan_out, bias=False, init=init)}
    if bias:  # one bias per earlier column, summed
        p["bias"] = (_uniform(rng, fan, (k, fan_out)) if init == "default" else
                     np.full((k, fan_out), TRUNC_BIAS if init == "truncated_normal" else 0.0, np.float32))
    return p


def init_columns(input_dim: int, width: int, n_hidden: int, num_outputs: int, num_tasks: int, lateral: str,
                 seed: int, from_input: bool = False, lateral_bias: bool = False, init: str = "default") -> dict:
    """Every column's parameters, drawn with NumPy: {"col_k": {"layers_i", "out", "lat_i", "lat_in"}}."""
    rng = np.random.default_rng([seed, 9137])
    sizes = [input_dim] + [width] * n_hidden
    columns = {}
    for k in range(num_tasks):
        col = {f"layers_{i}": _dense(rng, a, b, init=init) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
        col["out"] = _dense(rng, sizes[-1], num_outputs, init=init)
        if k > 0:
            for i, b in enumerate([width] * (n_hidden - 1) + [num_outputs]):
                col[f"lat_{i}"] = _lateral_params(rng, k, width, b, width, lateral, lateral_bias, init)
            if from_input:
                col["lat_in"] = _lateral_params(rng, k, input_dim, width, width, lateral, lateral_bias, init)
        columns[f"col_{k}"] = col
    return {"columns": columns}


def _lateral(p: dict, h):
    if "alpha" in p:
        h = jax.nn.relu((p["alpha"] * h) @ p["project"]["kernel"] + p["project"]["bias"])
    out = h @ p["out"]["kernel"]
    return out + jnp.sum(p["bias"], axis=0) if "bias" in p else out


class ProgressiveNet:
    """The forward pass of the columns (pure functions of the parameter tree)."""

    def __init__(self, n_hidden: int, num_tasks: int, dropout: float):
        self.n_hidden, self.num_tasks, self.dropout = n_hidden, num_tasks, dropout

    def column_logits(self, params, x, k: int, train: bool, key):
        """Column ``k``'s output (a Python int: the branch of the switch)."""
        cols = params["columns"]
        h0 = x.reshape((x.shape[0], -1))
        earlier: list[list] = [[] for _ in range(self.n_hidden)]
        out = None
        for j in range(k + 1):
            col = cols[f"col_{j}"]
            h, hidden = h0, []
            for i in range(self.n_hidden):
                z = h @ col[f"layers_{i}"]["kernel"] + col[f"layers_{i}"]["bias"]
                if i == 0 and "lat_in" in col:
                    z = z + _lateral(col["lat_in"], jnp.tile(h0, (1, j)))
                if i > 0 and j > 0:
                    z = z + _lateral(col[f"lat_{i - 1}"], jnp.concatenate(earlier[i - 1], axis=1))
                h = jax.nn.relu(z)
                if train and self.dropout > 0 and j == k:  # frozen columns compute as at evaluation
                    keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - self.dropout, h.shape)
                    h = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
                hidden.append(h)
            out = h @ col["out"]["kernel"] + col["out"]["bias"]
            if j > 0:
                out = out + _lateral(col[f"lat_{self.n_hidden - 1}"], jnp.concatenate(earlier[-1], axis=1))
            for i, hi in enumerate(hidden):
                earlier[i].append(hi)
        return out

    def apply(self, params, x, column, train: bool = False, key=None):
        """Logits of column ``column`` (a traced integer)."""
        if key is None:
            key = jax.random.PRNGKey(0)
        branches = [lambda p, xx, kk, k=k: self.column_logits(p, xx, k, train, kk) for k in range(self.num_tasks)]
        return jax.lax.switch(column, branches, params, x, key)


class PNNPart(Part):
    """The active column (the current task), as state."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.state = learner.put({"active": np.zeros((), np.int32)})


@ALGORITHMS.register("pnn", backend="jax")
class PNN(JaxLearner):
    part_classes = (PNNPart,)

    def __init__(self, cfg, stream, device, seed: int):
        bb = cfg.backbone
        if bb.type != "mlp":
            raise ConfigError(f"pnn builds MLP columns; backbone.type={bb.type} is not supported, use backbone=mlp.")
        if bb.n_hidden_layers < 1:
            raise ConfigError("pnn needs at least one hidden layer per column (backbone.n_hidden_layers >= 1).")
        if getattr(bb, "activation", "relu") != "relu":
            raise ConfigError(f"pnn's columns use ReLU (the paper's); backbone.activation={bb.activation} "
                              f"is not supported, use backbone.activation=relu.")
        if (getattr(bb, "head", "fixed") or "fixed") != "fixed":
            raise ConfigError(f"pnn has an output layer per column already; use backbone.head=fixed "
                              f"(got {bb.head}).")
        if list(cfg.algo.plugins):
            raise ConfigError("algo=pnn on backend=jax does not compose plugins; set algo.plugins=[].")
        super().__init__(cfg, stream, device, seed)
        self.net = ProgressiveNet(int(bb.n_hidden_layers), stream.num_tasks, float(bb.dropout))
        self.params = self.put(init_columns(int(math.prod(stream.input_shape)), int(bb.width),
                                            int(bb.n_hidden_layers), self.num_outputs(), stream.num_tasks,
                                            str(cfg.algo.lateral), derived_seed(seed, 9137),
                                            bool(cfg.algo.lateral_from_input), bool(cfg.algo.lateral_bias),
                                            str(getattr(bb, "init", "default"))))
        self._opt_init = jax.jit(self.tx.init)
        self.opt_state = self.put(set_lr(self._opt_init(self.params), float(cfg.optimizer.lr)))
        self.model = self.eval_model = None  # the columns have no single backbone module
        self._pnn_eval_fn = jax.jit(self._pnn_eval_program)

    @property
    def active(self) -> int:
        return int(self.parts[0].state["active"])

    def on_before_task(self, task) -> None:
        if task.id != self.active:  # a new column: the optimizer starts afresh over it
            self.opt_state = self.put(self._opt_init(self.params))
        self.parts[0].state = {"active": self.put(np.int32(task.id))}
        super().on_before_task(task)

    # -- training (traced) -------------------------------------------------------------------
    def loss_and_logits(self, params, part_states, x, y, t, weights, mask_table, dropout_key):
        logits = self.net.apply(params, x, part_states[0]["active"], train=True, key=dropout_key)
        return self.loss_from_logits(params, part_states, x, y, t, weights, mask_table, logits), logits

    def train_step(self, carry, batch, weights, x, y, t, mask_table):
        old_params = carry[0]
        active = carry[2][0]["active"]
        (params, opt_state, part_states, key), loss = super().train_step(carry, batch, weights, x, y, t, mask_table)
        cols = {name: jax.tree_util.tree_map(lambda o, n, k=int(name.split("_")[1]): jnp.where(active == k, n, o),
                                             old_params["columns"][name], col)
                for name, col in params["columns"].items()}
        return ({"columns": cols}, opt_state, part_states, key), loss

    # -- evaluation --------------------------------------------------------------------------
    def _pnn_eval_program(self, params, x, y, mask_table, task_id, active):
        self.trace_counts["eval"] += 1
        column = jnp.minimum(task_id, active)

        def batch(args):
            xb, yb = args
            logits = self.net.apply(params, xb, column)
            if self.masks:
                logits = jnp.where(mask_table[task_id], logits, -jnp.inf)
            return jnp.sum(jnp.argmax(logits, axis=1) == yb)

        return jnp.sum(jax.lax.map(batch, (x, y)))

    def evaluate(self, tasks, task_il: bool = False) -> dict[int, float]:
        if task_il and not self.masks:
            raise ConfigError("pnn on backend=jax evaluates with the stream's own scenario; "
                              "training.eval_task_il is not supported.")
        active = self.parts[0].state["active"]
        pending = []
        for task in tasks:
            x, y = self.test_arrays(task)
            task_id = self.put(np.int32(task.id))
            pending.append((task, self._pnn_eval_fn(self.params, x, y, self.mask_table, task_id, active)))
        return {task.id: 100.0 * int(correct) / max(task.num_test, 1) for task, correct in pending}

    def predict(self, x, task_id: int | None = None):
        column = min(task_id if task_id is not None else self.active, self.active)
        logits = self.net.apply(self.params, x, self.put(np.int32(column)))
        if self.masks and task_id is not None:
            logits = jnp.where(self.mask_table[task_id], logits, -jnp.inf)
        return jnp.argmax(logits, axis=1)
