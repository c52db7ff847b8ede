"""Check a composed config against the schemas and turn it into a typed config.

One function, :func:`validate_config`, is the only way a config reaches the rest of the program.
It maps SequeL-format quirks onto clrun keys (with warnings), rejects unknown keys naming the
nearest valid one, type-checks every value and checks every name against its registry, all
before any data is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cl_runner import catalog
from cl_runner.config.schema import SCENARIOS, AlgoConfig, RunConfig
from cl_runner.errors import ConfigError, closest
from cl_runner.registry import ALGORITHMS, BACKBONES, BACKENDS, BENCHMARKS, CALLBACKS, OPTIMIZERS, PLUGINS

# SequeL-format and legacy spellings -> clrun keys.
KEY_ALIASES = {
    "training.epoch_per_task": "training.epochs_per_task",
    "benchmark.eval_batchsize": "benchmark.eval_batch_size",
}
MODE_TO_BACKEND = {"pytorch": "torch", "torch": "torch", "jax": "jax"}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _nested_schema(cls, name: str):
    """The dataclass type of field ``name`` of ``cls`` if it is a nested section, else None."""
    f = _fields(cls)[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(default):
        return type(default)
    if name == "expected":
        from cl_runner.config.schema import ExpectedConfig

        return ExpectedConfig
    return None


def _check_keys(section: dict, cls, prefix: str) -> None:
    valid = _fields(cls)
    for key, value in section.items():
        path = f"{prefix}{key}"
        if key not in valid:
            near = closest(str(key), valid)
            hint = f" Did you mean '{prefix}{near}'?" if near else ""
            where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{path}'.{hint} Valid keys in {where}: "
                f"{', '.join(sorted(valid))}."
            )
        sub = _nested_schema(cls, key)
        if sub is not None and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a section of keys, got {value!r}.")
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, path + ".")


def _apply_aliases(raw: dict, warnings: list[str]) -> None:
    for old, new in KEY_ALIASES.items():
        sec, old_key = old.split(".")
        _, new_key = new.split(".")
        section = raw.get(sec)
        if isinstance(section, dict) and old_key in section:
            value = section.pop(old_key)
            if new_key in section and section[new_key] != value:
                raise ConfigError(f"both '{old}' and '{new}' are set, to different values; keep '{new}'.")
            section[new_key] = value
            warnings.append(f"'{old}' is read as '{new}'.")
    mode = raw.get("mode")
    if mode is not None:
        if mode not in MODE_TO_BACKEND:
            raise ConfigError(f"mode '{mode}' is not known; use mode: pytorch or mode: jax "
                              f"(or backend=torch / backend=jax).")
        backend = raw.setdefault("backend", {})
        if not isinstance(backend, dict):
            raise ConfigError("'backend' must be a section such as {name: torch}.")
        chosen = MODE_TO_BACKEND[mode]
        if "name" in backend and backend["name"] != chosen:
            raise ConfigError(f"mode: {mode} and backend.name: {backend['name']} disagree; keep one.")
        backend["name"] = chosen
    expected = raw.get("expected")
    if isinstance(expected, dict) and expected.get("avg_acc") is not None and expected.get("value") is None:
        expected["metric"] = "avg_acc"
        expected["value"] = expected["avg_acc"]
    if isinstance(expected, dict) and "source" not in expected and isinstance(raw.get("source"), str):
        expected["source"] = raw["source"]
    if raw.get("wandb") is not None:
        warnings.append("the 'wandb' block is kept in the config; W&B logging runs only when the "
                        "wandb logger is selected.")


def _type_error(ex: OmegaConfBaseException) -> ConfigError:
    key = getattr(ex, "full_key", None) or "?"
    msg = str(ex).splitlines()[0]
    m = re.match(r"Value '(.*)' of type '(.*)' could not be converted to (\w+)", msg)
    if m:
        msg = f"'{m.group(1)}' is not a valid {m.group(3).lower()}"
    return ConfigError(f"config key '{key}': {msg}.")


# Where a published-number check runs: ci (CPU, inside CI's budget), cpu (CPU, too long for CI),
# gpu (needs a GPU).
EXPECTED_TIERS = ("ci", "cpu", "gpu")
# Metrics of results.json an experiment file can compare (percent, like the papers).
EXPECTED_METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "avg_acc_task_il")


def _check_values(cfg: Any) -> None:
    def one_of(path: str, value: Any, choices) -> None:
        if value not in choices:
            near = closest(str(value), choices)
            hint = f" Did you mean '{near}'?" if near else ""
            raise ConfigError(f"config key '{path}': '{value}' is not one of {', '.join(choices)}.{hint}")

    def positive(path: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or not (value > 0) or not math.isfinite(value):  # NaN fails "> 0"
            raise ConfigError(f"config key '{path}' must be a positive number, got {value}.")

    def non_negative(path: str, value: Any) -> None:
        if not (value >= 0) or not math.isfinite(value):
            raise ConfigError(f"config key '{path}' must be a finite number >= 0, got {value}.")

    BENCHMARKS.entry(cfg.benchmark.name)
    BACKBONES.entry(cfg.backbone.type)
    OPTIMIZERS.entry(cfg.optimizer.type)
    BACKENDS.entry(cfg.backend.name)
    if cfg.benchmark.scenario is not None:
        one_of("benchmark.scenario", cfg.benchmark.scenario, SCENARIOS)
    one_of("benchmark.interpolation", cfg.benchmark.interpolation, ("nearest", "bilinear"))
    from cl_runner.benchmarks.mnist import rotation_jitter_mode

    rotation_jitter_mode(cfg.benchmark.rotation_jitter)
    one_of("training.eval_on", cfg.training.eval_on, ("all", "seen"))
    one_of("backbone.init", cfg.backbone.init, ("default", "xavier_uniform", "kaiming_normal", "truncated_normal"))
    one_of("backbone.activation", cfg.backbone.activation, ("relu", "tanh"))
    if cfg.backbone.activation != "relu" and cfg.backbone.type != "mlp":
        raise ConfigError(f"config key 'backbone.activation' chooses the MLP's nonlinearity; backbone "
                          f"'{cfg.backbone.type}' always uses relu. Set backbone.activation=relu.")
    from cl_runner.core.schedule import check_optimizer

    check_optimizer(cfg.optimizer, one_of, ConfigError)
    positive("benchmark.num_tasks", cfg.benchmark.num_tasks, allow_none=True)
    positive("benchmark.batch_size", cfg.benchmark.batch_size)
    positive("benchmark.eval_batch_size", cfg.benchmark.eval_batch_size)
    positive("benchmark.subset", cfg.benchmark.subset, allow_none=True)
    positive("benchmark.test_subset", cfg.benchmark.test_subset, allow_none=True)
    positive("benchmark.classes_per_task", cfg.benchmark.classes_per_task, allow_none=True)
    positive("training.epochs_per_task", cfg.training.epochs_per_task)
    positive("optimizer.lr", cfg.optimizer.lr)
    positive("optimizer.grad_clip_value", cfg.optimizer.grad_clip_value, allow_none=True)
    if cfg.backbone.batch_norm and cfg.backbone.type != "mlp":
        raise ConfigError(f"config key 'backbone.batch_norm' is read by backbone.type=mlp only (resnet18 "
                          f"has its batch norms always); got type '{cfg.backbone.type}': set backbone.batch_norm=false.")
    if cfg.backbone.batch_norm and cfg.backbone.head != "fixed":
        raise ConfigError(f"backbone.batch_norm=true normalises the output layer, which backbone.head="
                          f"{cfg.backbone.head} cannot grow; use backbone.head=fixed.")
    non_negative("optimizer.momentum", cfg.optimizer.momentum)
    non_negative("optimizer.weight_decay", cfg.optimizer.weight_decay)
    non_negative("optimizer.lr_min", cfg.optimizer.lr_min)
    non_negative("optimizer.lr_decay", cfg.optimizer.lr_decay)
    positive("optimizer.grad_clip_norm", cfg.optimizer.grad_clip_norm, allow_none=True)
    betas = list(cfg.optimizer.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"config key 'optimizer.betas' must be two numbers in [0, 1) (Adam's decay rates "
                          f"of the gradient mean and square), got {betas}.")
    positive("backbone.width", cfg.backbone.width)
    non_negative("backbone.n_hidden_layers", cfg.backbone.n_hidden_layers)
    positive("backbone.nf", cfg.backbone.nf)
    positive("backbone.num_classes", cfg.backbone.num_classes, allow_none=True)
    for i, c in enumerate(cfg.backbone.channels):
        positive(f"backbone.channels[{i}]", c)
    non_negative("benchmark.crop_padding", cfg.benchmark.crop_padding)
    non_negative("training.progress_every", cfg.training.progress_every)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"config key 'seed' must be an integer in [0, 2**32) (NumPy's seed range), "
                          f"got {cfg.seed}.")
    if not (0 <= cfg.backbone.dropout < 1):
        raise ConfigError(f"config key 'backbone.dropout' must be in [0, 1), got {cfg.backbone.dropout}.")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise ConfigError(f"config key 'device': '{cfg.device}' is not one of auto, cpu, cuda, cuda:N.")
    threads = cfg.threads
    if not (threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool) and threads > 0)):
        raise ConfigError(f"config key 'threads': '{threads}' is neither 'auto' nor a positive integer.")
    check_resume(cfg)
    if cfg.seeds is not None:
        check_seeds(cfg)
    if cfg.expected is not None:
        one_of("expected.tier", cfg.expected.tier, EXPECTED_TIERS)
        one_of("expected.metric", cfg.expected.metric, EXPECTED_METRICS)
        positive("expected.tolerance", cfg.expected.tolerance)
        positive("expected.seeds", cfg.expected.seeds)
    for plugin in cfg.algo.plugins:
        PLUGINS.entry(plugin)
    for logger in cfg.loggers:
        CALLBACKS.entry(logger)


def check_seeds(cfg) -> None:
    """``seeds``: a non-empty list of distinct non-negative integers, without ``resume``."""
    seeds = list(cfg.seeds)
    if not seeds:
        raise ConfigError("config key 'seeds' is an empty list; give seeds such as seeds=[0,1,2], "
                          "or seeds=null for the single run of 'seed'.")
    if any(not 0 <= s < 2**32 for s in seeds):
        raise ConfigError(f"config key 'seeds': seeds must be non-negative integers below 2**32, got {seeds}.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config key 'seeds' repeats a seed ({seeds}); list each seed once.")
    if cfg.resume and cfg.resume != "auto":
        raise ConfigError("resume cannot be combined with 'seeds': each seed's run is in its own folder "
                          "seed=<s>; resume one with seed=<s> \"resume='<run dir>/seed=<s>'\", or every seed "
                          "that has a checkpoint with resume=auto.")


def check_resume(cfg) -> None:
    """``resume``: null, a bool, ``auto`` or a run directory; ``overwrite`` does not go with a
    resume of this run's own directory."""
    resume = cfg.resume
    if not (resume is None or isinstance(resume, bool) or (isinstance(resume, str) and resume.strip())):
        raise ConfigError(f"config key 'resume': {resume!r} is not one of true, false, auto or the path "
                          f"of a run directory (quote a path that Hydra would read as a number).")
    if cfg.overwrite and (resume is True or resume == "auto"):
        raise ConfigError(f"resume={str(resume).lower()} continues the run in this directory and "
                          f"overwrite=true starts it again; choose one.")


def _check_algo_values(algo, algo_name: str) -> None:
    """The checks an algorithm's or plugin's schema defines itself (a ``check(algo)`` staticmethod)."""
    for cls in (ALGORITHMS.get(algo_name), *(PLUGINS.get(p) for p in algo.plugins)):
        check = getattr(cls, "check", None)
        if check is not None:
            check(algo)


def _apply_algo_settings(typed, algo_cls, warnings: list[str]) -> None:
    """Write the algorithm keys that stand for other sections' keys (the schema's ``replaces``:
    algo key -> "section.key") into those sections, before anything reads them: the run, its
    threads and seeds, and results.json's config then all see the values that are used. A key
    set to null leaves its section's value. When the section's value was set away from its
    default to something else, a warning says which value wins."""
    replaces = getattr(algo_cls, "replaces", None) or {}
    defaults = RunConfig()
    for key, target in replaces.items():
        value = typed.algo[key]
        if value is None:
            continue
        section, name = target.split(".")
        current = typed[section][name]
        default = getattr(getattr(defaults, section), name)
        if current != value and current != default:
            warnings.append(f"algo.{key}={value} replaces {target}={current} for algo={typed.algo.name}; "
                            f"set algo.{key}=null to use {target}.")
        typed[section][name] = value


def _check_scenario(cfg) -> None:
    """An algorithm runs only in the scenarios its method defines."""
    scenario = cfg.benchmark.scenario or BENCHMARKS.get(cfg.benchmark.name).default_scenario
    supported = ALGORITHMS.meta(cfg.algo.name).get("scenarios") or SCENARIOS
    if scenario not in supported:
        raise ConfigError(f"algorithm '{cfg.algo.name}' is not defined for the {scenario} scenario "
                          f"(it supports: {', '.join(supported)}); choose benchmark.scenario="
                          f"{supported[0]} or another algorithm.")


def _check_eval_task_il(cfg) -> None:
    """training.eval_task_il is defined for class-IL streams only; the task-IL metric needs it."""
    scenario = cfg.benchmark.scenario or BENCHMARKS.get(cfg.benchmark.name).default_scenario
    if cfg.training.eval_task_il and scenario != "class_il":
        why = ("its avg_acc already is the task-IL accuracy" if scenario == "task_il" else
               "every task uses the same output units, so there is nothing to mask")
        raise ConfigError(f"config key 'training.eval_task_il' evaluates a class-IL run as task-IL; this "
                          f"stream is {scenario} ({why}). Set training.eval_task_il=false, or "
                          f"benchmark.scenario=class_il.")
    if cfg.expected is not None and cfg.expected.metric.endswith("_task_il") and not cfg.training.eval_task_il:
        raise ConfigError(f"expected.metric '{cfg.expected.metric}' is measured only with "
                          f"training.eval_task_il=true.")


def compose_algo_schema(algo_cls, algo_name: str, plugins) -> type:
    """The algorithm's schema extended with the keys of every plugin composed onto it."""
    if not plugins:
        return algo_cls
    if isinstance(plugins, str) or not isinstance(plugins, (list, tuple)):
        raise ConfigError(f"algo.plugins must be a list such as [ewc], got {plugins!r}.")
    have = {f.name for f in dataclasses.fields(algo_cls)}
    extra = []
    for plugin in plugins:
        if plugin == algo_name:
            raise ConfigError(f"algo.plugins lists '{plugin}', which is already the algorithm itself.")
        plugin_cls = PLUGINS.get(plugin)
        hints = typing.get_type_hints(plugin_cls)
        for f in dataclasses.fields(plugin_cls):
            if f.name in have or f.name in ("name", "plugins"):
                continue
            default = (dataclasses.field(default_factory=f.default_factory)
                       if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
            extra.append((f.name, hints[f.name], default))
            have.add(f.name)
    return dataclasses.make_dataclass(f"{algo_cls.__name__}_with_{'_'.join(plugins)}", extra, bases=(algo_cls,))


def validate_config(cfg: DictConfig | dict) -> tuple[DictConfig, list[str]]:
    """Return the typed, validated config and the warnings to show the user."""
    catalog.load()
    warnings: list[str] = []
    if isinstance(cfg, DictConfig):
        try:
            raw = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as ex:
            raise ConfigError(f"config could not be resolved: {str(ex).splitlines()[0]}") from None
    else:
        raw = copy.deepcopy(dict(cfg))  # the aliases below edit sections in place
    raw.pop("hydra", None)
    _apply_aliases(raw, warnings)
    _check_keys({k: v for k, v in raw.items() if k != "algo"}, RunConfig, "")

    algo = raw.get("algo") or {}
    if not isinstance(algo, dict):
        raise ConfigError("'algo' must be a section with at least a 'name' key, e.g. algo: {name: ewc}.")
    algo_name = algo.get("name", AlgoConfig.name)
    algo_cls = compose_algo_schema(ALGORITHMS.get(algo_name), algo_name, algo.get("plugins") or [])
    _check_keys(algo, algo_cls, "algo.")

    schema = OmegaConf.structured(RunConfig)
    with_algo = OmegaConf.structured(algo_cls)
    OmegaConf.set_struct(schema, False)
    schema.algo = with_algo
    OmegaConf.set_struct(schema, True)
    try:
        typed = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as ex:
        raise _type_error(ex) from None
    _check_algo_values(typed.algo, algo_name)
    _apply_algo_settings(typed, algo_cls, warnings)
    _check_values(typed)
    _check_scenario(typed)
    _check_eval_task_il(typed)
    return typed, warnings
