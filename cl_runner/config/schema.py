"""Typed schemas of every config section.

The YAML files under ``conf/`` and experiment files (including SequeL-format ones) are checked
against these dataclasses by :func:`cl_runner.config.validate.validate_config` before any data is
loaded. Algorithm-specific keys live in dataclasses that subclass :class:`AlgoConfig` and are
registered with the algorithm (``cl_runner/algorithms/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

SCENARIOS = ("class_il", "task_il", "domain_il")


@dataclass
class BenchmarkConfig:
    name: str = "rotatedmnist"
    # class_il | task_il | domain_il; null takes the benchmark's usual scenario.
    scenario: Optional[str] = None
    # null takes the benchmark's default (20 for rotated/permuted, 5 for split MNIST).
    num_tasks: Optional[int] = None
    # Rotated: task t is rotated by t * per_task_rotation degrees (t from 0).
    per_task_rotation: float = 9.0
    # Rotated: false: task t's angle is t*step; sample (or true): each sample's angle is drawn
    # uniformly inside the task's bin [t*step, (t+1)*step); task: one angle per task drawn
    # uniformly inside its bin (the GEM protocol's mnist_rotations).
    rotation_jitter: Any = False
    # Rotated: nearest (as PIL / torchvision rotate by default) or bilinear.
    interpolation: str = "nearest"
    # Permuted: leave the first task's pixels in their original order.
    first_task_unpermuted: bool = False
    # Split: classes per task (null: 2 for the 10-class datasets).
    classes_per_task: Optional[int] = None
    # Split: null keeps 0..9; "seed" shuffles with the seed; or an explicit list of classes.
    class_order: Optional[Any] = None
    # Training samples per task drawn from the train split (null: all of them).
    subset: Optional[int] = None
    # Test samples per task (null: the whole test split).
    test_subset: Optional[int] = None
    batch_size: int = 10
    eval_batch_size: int = 1000
    # Standardise inputs with the dataset's mean and std (else scale to [0, 1]).
    normalize: bool = True
    # Zero-pad images to this side length (e.g. 32 for the Hsu et al. 2018 protocol).
    pad_to: Optional[int] = None
    # Cache built task tensors on disk, keyed by every parameter above.
    cache: bool = True
    # Train-time augmentation on the device, per training batch: a random crop of the image's
    # size from the image zero-padded by crop_padding pixels per side, then a horizontal flip
    # with probability 1/2 (the standard CIFAR / Tiny ImageNet recipe). Evaluation never augments.
    augment: bool = False
    crop_padding: int = 4
    # With augment: false leaves out the flip (the crop only: GDumb's recipe for MNIST, whose
    # digits are not mirror-symmetric; drimpossible/GDumb src/dataloader.py:112-128).
    augment_flip: bool = True


@dataclass
class BackboneConfig:
    type: str = "mlp"
    n_hidden_layers: int = 2
    width: int = 256
    # Output units; null takes what the stream needs (10 for MNIST class/domain-IL).
    num_classes: Optional[int] = None
    dropout: float = 0.0
    # mlp: the hidden layers' nonlinearity, relu or tanh (some reference MLPs use tanh).
    activation: str = "relu"
    # cnn: output channels of each conv block.
    channels: List[int] = field(default_factory=lambda: [32, 64])
    # Weight initialisation: default (PyTorch's: U(+-1/sqrt(fan_in)) for weights and biases) or
    # xavier_uniform (Glorot: U(+-sqrt(6 / (fan_in + fan_out))) weights, zero biases; GEM's MLP) or
    # kaiming_normal (He: N(0, 2 / fan_in) weights, zero biases; La-MAML's model/meta/learner.py:72-77) or
    # truncated_normal (N(0, 0.1^2) weights truncated at 2 std, biases 0.1; TensorFlow's
    # truncated_normal_initializer(stddev=0.1) as A-GEM's model/model.py:24-60 uses it).
    init: str = "default"
    # Output layer: fixed (one layer over every unit), incremental (class-IL, domain-IL: units added
    # when new classes appear) or multihead (task-IL: a head added per task); torch backend.
    head: str = "fixed"
    # mlp: each linear layer (the output layer too) without a bias and followed by batch norm
    # (PyTorch's BatchNorm1d: momentum 0.1, eps 1e-5), the hidden ones then ReLU: GDumb's MNIST MLP.
    batch_norm: bool = False
    # resnet18: base filters (20: the reduced ResNet-18 of GEM / A-GEM; 64: the full one of DER).
    nf: int = 64
    # resnet18: fp32, or bf16 (bfloat16 mixed precision: convolutions in bf16, parameters,
    # batch-norm statistics and the head in float32; meant for GPUs).
    precision: str = "fp32"


@dataclass
class ScheduleConfig:
    """The learning rate inside each task, set at the start of every epoch (epoch e from 0 of
    the task's E epochs) as a factor of the task's learning rate (``OptimizerConfig``). The
    schedule starts again with every task, as a scheduler rebuilt per task does (Mammoth's
    get_scheduler)."""

    # constant | multistep (x gamma at each milestone: torch's MultiStepLR stepped per epoch) |
    # cosine (eta_min + (lr - eta_min) (1 + cos(pi e' / E')) / 2 with e' = e - warmup_epochs,
    # E' = E - warmup_epochs: torch's CosineAnnealingLR with T_max = E', stepped per epoch).
    name: str = "constant"
    # multistep: the epochs (from 0, ascending) from which the rate is multiplied by gamma once more.
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    # cosine: the rate the cosine reaches at epoch E (absolute, like torch's eta_min).
    eta_min: float = 0.0
    # Linear warm-up over the task's first epochs: epoch e < warmup_epochs runs at
    # warmup_start + (1 - warmup_start) * e / warmup_epochs of the rate (GDumb's one epoch at a
    # tenth of the rate is warmup_epochs=1, warmup_start=0.1); the schedule above runs after it.
    warmup_epochs: int = 0
    warmup_start: float = 0.1


@dataclass
class OptimizerConfig:
    type: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # The learning rate of task t (t from 0) is max(lr * lr_decay ** (t + lr_decay_offset), lr_min)
    # (Stable SGD / SequeL convention); lr_decay_offset 1 decays the first task already (Stable
    # SGD counts its tasks from 1).
    lr_decay: float = 1.0
    lr_decay_offset: int = 0
    lr_min: float = 0.0
    # Start the optimizer afresh (momentum buffers, Adam's moments and step count cleared, as a
    # newly built optimizer has them): never, at the start of every task, or of every epoch.
    reset: str = "never"
    # The learning rate inside each task (per epoch): see ScheduleConfig.
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Clip the global gradient norm to this value (null: no clipping).
    grad_clip_norm: Optional[float] = None
    # Clip each gradient element to [-grad_clip_value, grad_clip_value] (null: no clipping), as
    # torch.nn.utils.clip_grad_value_ (Mammoth's SI, models/si.py). Applied to the full gradient
    # (task loss plus any penalty), after grad_clip_norm, before weight decay and momentum.
    grad_clip_value: Optional[float] = None


@dataclass
class TrainingConfig:
    epochs_per_task: int = 1
    # Evaluate after each task on "all" tasks (full accuracy matrix) or only the "seen" ones.
    eval_on: str = "all"
    # Evaluate the untrained model once before the first task (needed for forward transfer).
    eval_initial: bool = True
    # Class-IL streams: after each task also evaluate every task with only its own classes'
    # output units (task-IL evaluation of the same run, as the DER paper reports): a second
    # accuracy matrix, acc_matrix_task_il, and avg_acc_task_il, forgetting_task_il, bwt_task_il.
    # An error in the task_il and domain_il scenarios.
    eval_task_il: bool = False
    # Stop with an error when the loss becomes NaN or infinite.
    check_finite: bool = True
    # Steps between progress updates (0: about four times a second).
    progress_every: int = 0


@dataclass
class BackendConfig:
    name: str = "torch"
    # torch: compile the train step with torch.compile.
    compile: bool = False
    # torch: MLP backbones train with a step written out in tensor operations (the same
    # kernels autograd calls, without the autograd engine; backends/torch/fused.py).
    # false: autograd and torch.optim for every step.
    fused_step: bool = True
    # torch on a CPU: how the SGD update (with EWC's or MAS's penalty gradient) runs
    # (backends/torch/update.py): c (a small C file compiled once into the cache by the system's
    # compiler), numba, compile (torch.compile), fused (torch's fused SGD kernel), foreach
    # (torch._foreach ops), or auto (the first of update.AUTO_ORDER this machine has).
    # results.json records the path that ran and why (kernels.update).
    update_path: str = "auto"
    # false: the same as update_path=foreach (PyTorch's kernels; kept for older configs).
    native_update: bool = True
    # torch on a CUDA GPU: runs of 64 training steps recorded once per epoch as a CUDA graph and
    # replayed (backends/torch/graphs.py), where the step allows it (the fused MLP step, plain
    # SGD, EWC's or MAS's penalty); no effect on a CPU. false: every step launched from Python.
    cuda_graphs: bool = True
    # torch: ask for deterministic kernels (CPU runs are deterministic either way).
    deterministic: bool = False
    # jax with seeds=[...]: how the seeds share one program. vmap: batched arithmetic (GPUs);
    # unroll: each step takes every seed's step in turn (faster on CPUs, slower to compile);
    # auto: unroll on a CPU for runs of 10,000 steps or more, else vmap.
    seed_program: str = "auto"


@dataclass
class AlgoConfig:
    """Keys every algorithm has; each algorithm subclasses this with its own."""

    name: str = "naive"
    # Extra parts composed onto the algorithm, e.g. [ewc] for ER + EWC.
    plugins: List[str] = field(default_factory=list)


@dataclass
class ExpectedConfig:
    """A published number this run should reproduce."""

    metric: str = "avg_acc"
    value: Optional[float] = None
    tolerance: float = 3.0
    seeds: int = 1
    source: Optional[str] = None
    tier: str = "ci"
    known_gap: Optional[str] = None
    # SequeL-format files write ``expected: {avg_acc: 82.3}``; that is read as metric/value.
    avg_acc: Optional[float] = None


@dataclass
class RunConfig:
    seed: int = 0
    # Several seeds in one run, e.g. [0,1,2,3,4]; when set it replaces ``seed``. The jax backend
    # trains them together (one compiled program per epoch), torch one after another; each seed
    # writes seed=<s>/results.json, and aggregate.json holds the mean and std over seeds.
    seeds: Optional[List[int]] = None
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # CPU threads for the math library: "auto" (chosen from the model size) or a number.
    threads: Any = "auto"
    results_file: str = "results.json"
    # The metric a sweep optimises and ``clrun`` returns to Hydra's sweeper (avg_acc, forgetting,
    # bwt, fwt, total_time_s, steps_per_s); Optuna maximises or minimises it as fits the metric.
    objective: str = "avg_acc"
    # Print the rich progress display (null: only when writing to a terminal).
    progress: Optional[bool] = None
    # Loggers fed by the run's events: console, jsonl, csv, plots, tensorboard, wandb.
    loggers: List[str] = field(default_factory=lambda: ["console", "jsonl", "csv", "plots"])
    # Save a checkpoint after every task (and keep it on Ctrl-C / SIGTERM) so a run can resume.
    checkpoint: bool = True
    # Continue an interrupted run from its last complete task: true (the checkpoint in this
    # run's own directory, e.g. with hydra.run.dir=<old dir>), auto (that checkpoint when it
    # exists, else start: a requeued job or a re-run sweep continues with the same command) or
    # the path of the old run dir.
    resume: Optional[Any] = None
    # Start again in a run directory that holds an earlier run's checkpoint, replacing it (without
    # it, or resume, such a run stops with an error rather than overwrite the checkpoint).
    overwrite: bool = False
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    expected: Optional[ExpectedConfig] = None
    # SequeL-format keys: ``mode`` (pytorch | jax) selects the backend; the others are kept.
    mode: Optional[str] = None
    version: Optional[str] = None
    source: Optional[str] = None
    wandb: Optional[Any] = None
