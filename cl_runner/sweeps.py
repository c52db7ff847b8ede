"""What ``clrun -m`` adds to Hydra's multirun: ready sweep files, job directory names, Optuna
defaults, and a CPU budget for jobs that run side by side.

* Sweep files are the YAML files in the ``sweeps/`` folder (:mod:`cl_runner.resources`). Each is registered as an
  option of the config group ``sweep`` (at the global package, as ``# @package _global_`` says at
  the top of each file), so ``clrun -m +sweep=rotatedmnist_methods`` runs one. A sweep file sets
  ``hydra.sweeper.params`` (and anything else, e.g. ``hydra/sweeper: optuna``).
* ``${clrun.job_dirname:${hydra:job.override_dirname},${seed}}`` (``hydra.sweep.subdir`` in
  ``conf/config.yaml``) names a job's directory from its overrides, seed last:
  ``algo=ewc,optimizer.lr=0.1,seed=2``.
* When the Optuna sweeper is selected, its direction follows the ``objective`` metric
  (``avg_acc`` is maximised, ``forgetting`` minimised) and a failed trial does not stop the study,
  unless the command line says otherwise (see :func:`optuna_overrides`).
* :func:`cpu_budget` says how many CPU cores one job may use under a parallel launcher, so N jobs
  on N cores do not each start N threads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from cl_runner.resources import EXPECTED_DIR, SWEEPS_DIR

SWEEP_GROUP = "sweep"
# Experiment files that reproduce published numbers (EXPECTED_DIR): options of the ``expected`` group.
EXPECTED_GROUP = "expected"
# Folders of a user's own experiment files (os.pathsep-separated), options of the ``expected``
# group beside clrun's; a name in one of them hides clrun's file of that name.
EXPECTED_DIRS_ENV = "CLRUN_EXPECTED_DIRS"

# Metrics that can be the objective a sweep returns, and which way is better.
OBJECTIVES = {
    "avg_acc": "maximize",
    "forgetting": "minimize",
    "bwt": "maximize",
    "fwt": "maximize",
    "avg_acc_task_il": "maximize",
    "total_time_s": "minimize",
    "steps_per_s": "maximize",
}
DEFAULT_OBJECTIVE = "avg_acc"

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
# hydra-optuna-sweeper's own defaults; clrun replaces them unless the command line sets them.
_OPTUNA_PLUGIN_DIRECTION = "minimize"
_OPTUNA_PLUGIN_MAX_FAILURE_RATE = 0.0
# clrun's default: every failed trial is recorded as FAIL and the study goes on (see docs/SWEEPS.md).
OPTUNA_MAX_FAILURE_RATE = 1.0

# A directory name longer than this is shortened to a prefix plus a hash of the whole name
# and the seed (most file systems refuse names over 255 bytes).
MAX_DIRNAME_BYTES = 240

_broken_sweep_files: dict[tuple[str, str], str] = {}


# -- job directories ----------------------------------------------------------------------------
def job_dirname(override_dirname: Any, seed: Any) -> str:
    """``<overrides>,seed=<seed>``: a readable name that differs between any two jobs of a sweep.

    ``/`` in a value becomes ``_`` (a name must stay one directory). When the name would be longer
    than :data:`MAX_DIRNAME_BYTES`, the overrides are cut and followed by a hash of all of them;
    the seed stays at the end.
    """
    overrides = str(override_dirname or "").replace(os.sep, "_")
    suffix = "" if seed is None else f"seed={seed}"
    name = ",".join(p for p in (overrides, suffix) if p) or "job"
    if len(name.encode()) > MAX_DIRNAME_BYTES:
        digest = hashlib.sha1(overrides.encode()).hexdigest()[:12]
        room = MAX_DIRNAME_BYTES - len(digest) - len(suffix.encode()) - 2
        name = f"{overrides.encode()[:room].decode(errors='ignore')}-{digest},{suffix}".rstrip(",")
    return name


def register_resolvers() -> None:
    """Make ``${clrun.job_dirname:...}`` known to OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("clrun.job_dirname"):
        OmegaConf.register_new_resolver("clrun.job_dirname", job_dirname)


# -- sweep files --------------------------------------------------------------------------------
def sweep_files(directory: Path = SWEEPS_DIR) -> dict[str, Path]:
    """Ready sweeps by name (file name without ``.yaml``)."""
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def expected_dirs() -> list[Path]:
    """The folders of experiment files: clrun's own, then those of $CLRUN_EXPECTED_DIRS."""
    from cl_runner.errors import ConfigError

    extra = []
    for entry in filter(None, os.environ.get(EXPECTED_DIRS_ENV, "").split(os.pathsep)):
        folder = Path(entry).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"${EXPECTED_DIRS_ENV} names {entry}, which is not a folder: give "
                              f"folders of experiment files (<name>.yaml), separated by '{os.pathsep}'.")
        extra.append(folder)
    return [EXPECTED_DIR, *extra]


def register_sweep_files(directory: Path = SWEEPS_DIR, expected_dir: Path | None = None) -> None:
    """Store every sweep file as an option of the ``sweep`` config group, and every experiment
    file of ``expected_results/`` (and of the folders of $CLRUN_EXPECTED_DIRS) as an option of
    the ``expected`` group (both at the global package: ``clrun +expected=der_seqmnist_der500``
    applies the whole protocol).

    A file that does not parse is left out; :func:`broken_sweep_file` then gives its error.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    folders = [(SWEEP_GROUP, directory)]
    folders += [(EXPECTED_GROUP, d) for d in ([expected_dir] if expected_dir else expected_dirs())]
    for group, folder in folders:
        for name, path in sweep_files(folder).items():
            try:
                node = OmegaConf.load(path)
            except Exception as ex:  # noqa: BLE001 - any YAML error is reported when the file is used
                kind = "sweep file" if group == SWEEP_GROUP else "experiment file"
                _broken_sweep_files[(group, name)] = f"{kind} {path} could not be read: {str(ex).splitlines()[0]}"
                continue
            store.store(group=group, name=name, node=node, package="_global_",
                        provider=f"clrun {folder.name}/")


def expected_files(directory: Path | None = None) -> dict[str, Path]:
    """Experiment files that reproduce published numbers, by name (of ``directory``, else of
    every folder of :func:`expected_dirs`, a later folder's file hiding an earlier one's)."""
    if directory is not None:
        return sweep_files(directory)
    files: dict[str, Path] = {}
    for folder in expected_dirs():
        files.update(sweep_files(folder))
    return dict(sorted(files.items()))


def broken_sweep_file(name: str, group: str = SWEEP_GROUP) -> str | None:
    return _broken_sweep_files.get((group, name))


# -- Optuna ---------------------------------------------------------------------------------------
def objective_direction(objective: str) -> str:
    from cl_runner.errors import ConfigError, did_you_mean

    if objective not in OBJECTIVES:
        raise ConfigError(f"config key 'objective': '{objective}' is not a metric a sweep can "
                          f"optimise.{did_you_mean(str(objective), list(OBJECTIVES))} "
                          f"Valid objectives: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[objective]


def is_optuna(sweeper: Mapping | None) -> bool:
    return bool(sweeper) and sweeper.get("_target_") == OPTUNA_SWEEPER


def optuna_overrides(sweeper: Mapping, objective: str, command_line_keys: set[str]) -> list[str]:
    """Hydra overrides that adapt the Optuna sweeper to clrun, for settings the command line and
    the config files leave at the plugin's defaults:

    * ``direction``: the objective's (``maximize`` for ``avg_acc``), not the plugin's ``minimize``;
    * ``max_failure_rate``: 1.0, so a failed trial is recorded as FAIL and the study goes on. The
      plugin compares the failed fraction of each batch of ``n_jobs`` trials with this rate, so any
      value below 1.0 with ``n_jobs: 1`` stops the study at the first failure.
    """
    out = []
    wanted = objective_direction(objective)
    direction = sweeper.get("direction")
    direction = getattr(direction, "name", direction)
    if "hydra.sweeper.direction" not in command_line_keys and isinstance(direction, str) \
            and direction != wanted:
        out.append(f"hydra.sweeper.direction={wanted}")
    if "hydra.sweeper.max_failure_rate" not in command_line_keys \
            and sweeper.get("max_failure_rate") == _OPTUNA_PLUGIN_MAX_FAILURE_RATE:
        out.append(f"hydra.sweeper.max_failure_rate={OPTUNA_MAX_FAILURE_RATE}")
    return out


def sqlite_path(storage: Any) -> Path | None:
    """The database file of a ``sqlite:///<path>`` storage URL, else None."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return None
    path = storage[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


# -- CPU budget -----------------------------------------------------------------------------------
def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_budget(launcher: Mapping | None, cores: int | None = None) -> int | None:
    """Cores one job may use under ``launcher`` (Hydra's ``hydra.launcher`` config).

    * joblib: ``cores // n_jobs`` (at least 1); ``n_jobs`` -1 means one job per core, -2 one job
      per core but one, as in joblib;
    * submitit (SLURM or local): ``cpus_per_task`` when set, else the cores this process may use
      (SLURM restricts a job to its allocation);
    * any other launcher runs one job at a time: None, the run's usual choice.
    """
    if not launcher:
        return None
    target = str(launcher.get("_target_", ""))
    cores = cores or usable_cores()
    if "hydra_joblib_launcher" in target:
        n_jobs = launcher.get("n_jobs") or 1
        if n_jobs < 0:
            n_jobs = max(1, cores + 1 + n_jobs)
        return max(1, cores // n_jobs)
    if "hydra_submitit_launcher" in target:
        per_task = launcher.get("cpus_per_task")
        return max(1, min(cores, int(per_task))) if per_task else cores
    return None
