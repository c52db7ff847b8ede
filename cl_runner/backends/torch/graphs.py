"""Training steps recorded once and replayed as a CUDA graph (PyTorch backend, CUDA devices).

At the batch sizes of the MNIST protocols (10 samples) an MLP's training step is a few dozen small
kernels, and on a GPU their launches from Python, not their arithmetic, set the speed: an eager step
costs a few hundred microseconds of which the GPU is busy for a fraction. A :class:`StepGraph`
records :attr:`TorchLearner.cuda_graph_steps` consecutive training steps as one CUDA graph, each
step gathering its batch on the device from the task's tensors by indices read from a fixed
buffer, and replays the recording for every later run of that many steps of the epoch: one launch
and no Python per step. The recording is made afresh every epoch (a task brings new tensors, an
algorithm may change the learning rate or its penalty between tasks); the steps left over at the
end of an epoch run as usual.

A recording replays the same kernels on the same memory, so only steps with no host
synchronisation and no Python decisions that depend on tensor values can be recorded
(:func:`graph_refusal` says why a step cannot): the fused MLP step with its plain cross-entropy,
plain SGD, and the importance penalties' gradient (EWC, MAS). Dropout draws from the default CUDA
generator, which a recording advances on every replay as an eager step would.

``backend.cuda_graphs=false`` turns it off. On a CPU the same chunks run eagerly (``capture=False``),
which is how tests/test_cuda_graphs.py checks, without a GPU, that the chunked epoch trains on
exactly the batches, in exactly the order, of the step-by-step one.
"""

from __future__ import annotations

import torch


def graph_refusal(learner, step_callbacks, device_type: str) -> str | None:
    """Why ``learner``'s training steps cannot be recorded as a CUDA graph on a ``device_type``
    device (None: they can)."""
    from cl_runner.backends.torch.heads import GrowingHead
    from cl_runner.backends.torch.learner import TorchLearner
    from cl_runner.backends.torch.regularization import ImportanceRegularizer

    if device_type != "cuda":
        return "the device is not a CUDA GPU"
    if not getattr(learner.cfg.backend, "cuda_graphs", True):
        return "backend.cuda_graphs=false"
    if type(learner).train_step is not TorchLearner.train_step:
        return f"algo={learner.cfg.algo.name} has its own training step"
    fused = learner._fused
    if fused is None or not learner._fused_plain:
        return ("the step is not the fused MLP step with the plain cross-entropy (the backbone is not "
                "a plain MLP, torch.compile is on, or a part adds a loss term)")
    if fused.hooks:
        return "a parameter has gradient hooks"
    if learner._fast_sgd is not learner.optimizer:
        return "the optimizer is not plain SGD"
    if learner.augment is not None:
        return "benchmark.augment draws from its own generator"
    if step_callbacks:
        return "a callback runs at every step"
    if learner._step_parts:
        return "a part runs after every step"
    for part in learner._grad_parts:
        if not ImportanceRegularizer.adds_only_the_penalty(part):
            return f"{type(part).__name__} adjusts the gradients in Python"
    head = getattr(learner.model, "head", None)
    if learner.train_t is not None and isinstance(head, GrowingHead) and head.kind == "multihead":
        return "the multi-head layer drops the gradients of heads absent from a batch (a host decision)"
    return None


class StepGraph:
    """``steps`` consecutive training steps of ``learner``'s current epoch, recorded on the first
    call after a warm-up (``capture``: on a CUDA device) and replayed on the later ones; run
    eagerly every time without ``capture``."""

    def __init__(self, learner, steps: int, capture: bool):
        self.learner = learner
        self.steps = int(steps)
        self.capture = bool(capture)
        device = learner.device
        self.index = torch.empty(self.steps * learner.batch_size, dtype=torch.long, device=device)
        self.losses = torch.empty(self.steps, device=device)
        self.graph = None
        self.warm = False

    def _steps(self) -> None:
        learner, bs = self.learner, self.learner.batch_size
        xs, ys, ts = learner.train_x, learner.train_y, learner.train_t
        for k in range(self.steps):
            idx = self.index[k * bs:(k + 1) * bs]
            loss = learner.train_step(xs.index_select(0, idx), ys.index_select(0, idx),
                                      ts.index_select(0, idx) if ts is not None else None)
            self.losses[k] = loss

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        """Train the steps whose batches are ``samples`` (``steps * batch_size`` indices into the
        task's tensors, in order); returns their losses (a buffer the next call overwrites)."""
        self.index.copy_(samples)
        if not self.capture:
            self._steps()
        elif self.graph is not None:
            self.graph.replay()
        elif not self.warm:
            # The first run is eager, on a side stream as the recording will be: it creates what a
            # recording cannot (the momentum buffers, the constant of the loss's gradient, the
            # libraries' workspaces).
            current = torch.cuda.current_stream(self.index.device)
            side = torch.cuda.Stream(self.index.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._steps()
            current.wait_stream(side)
            self.warm = True
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._steps()
            self.graph = graph
            graph.replay()  # a recording runs nothing: these steps are trained now
        return self.losses
