"""The ``clrun`` command: a Hydra application over ``conf/``.

Before Hydra starts, the command-line overrides are composed once and validated, so a typo or a
wrong type is reported with the nearest valid key (Hydra alone would only say the key is not in
the config). Keys that clrun knows but a shared experiment file does not set (e.g. ``data_dir``
with a SequeL-format file) are added rather than rejected. With ``-m`` every job of the sweep is
checked the same way before the first one starts; ``+sweep=<name>`` selects a ready sweep from
``sweeps/`` (see :mod:`cl_runner.sweeps`; :mod:`cl_runner.resources` says where these folders
are, in a checkout or in the installed wheel), and each job returns its ``objective`` metric to the
sweeper. ``clrun --rerun <run dir>`` runs a saved run's config again (:mod:`cl_runner.rerun`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from pathlib import Path

from rich.console import Console

from cl_runner import resources, sweeps

CONF_DIR = str(resources.CONF_DIR)

# ${clrun.job_dirname:...} names sweep jobs' directories; processes that run jobs of a sweep
# (joblib, submitit) import this module to unpickle the task, which registers it there too.
sweeps.register_resolvers()

_HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--shell-completion", "-sc", "--info", "-i",
                            "--version")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False)
    sys.exit(2)


def print_registry(pattern: str = "*") -> None:
    from rich.table import Table

    from cl_runner import catalog
    from cl_runner.registry import ALGORITHMS, BACKBONES, BACKENDS, BENCHMARKS, OPTIMIZERS, PLUGINS

    catalog.load()
    for backend in ("torch", "jax"):
        try:
            catalog.load_backend(backend)
        except Exception:  # noqa: BLE001 - a missing optional backend just shows fewer entries
            pass
    console = Console()
    for reg in (BENCHMARKS, ALGORITHMS, PLUGINS, BACKBONES, OPTIMIZERS, BACKENDS):
        table = Table(title=reg.plural, title_justify="left")
        table.add_column("name")
        table.add_column("backends")
        table.add_column("about")
        for name, entry in reg.items():
            if not re.fullmatch(pattern.replace("*", ".*"), name):
                continue
            about = entry.meta.get("summary", "")
            if entry.meta.get("paper"):
                about = f"{about} ({entry.meta['paper']})" if about else entry.meta["paper"]
            table.add_row(name, ", ".join(entry.backends) or "(any)", about)
        console.print(table)


def _set_path(raw: dict, dotted: str, value) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _has_path(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _concrete_lines(o) -> list[str] | None:
    """The single-value overrides a (sweep) override stands for: every value of a choice or range
    sweep, both ends of an interval (Optuna); None for what only Hydra can expand (glob)."""
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import HydraException

    if not o.is_sweep_override():
        return [o.input_line]
    key = o.get_key_element()
    value = o.value()
    if isinstance(value, IntervalSweep):
        return [f"{key}={value.start}", f"{key}={value.end}"]
    try:
        lines = [f"{key}={v}" for v in o.sweep_string_iterator()]
    except HydraException:
        return None
    return lines or None


# A product of group sweeps (algo=a,b,c x benchmark=...) up to this many jobs is validated job by
# job; beyond it each value is validated once, with the first value of every other sweep.
_MAX_JOBS_CHECKED = 64


def _sweep_variants(overrides, is_value) -> list[tuple[list[str], list[str], str | None]]:
    """The jobs worth validating, each as (its override lines, the swept lines among them, the one
    value line it changes from the first job or None): every combination of group sweeps (which
    change the keys a job has), then every other value of each value sweep (which only changes a
    value, so it is checked on the first job's config without composing again)."""
    import itertools

    axes = []
    for o in overrides:
        lines = _concrete_lines(o)
        if lines is None:
            raise LookupError(o.input_line)
        axes.append(lines)
    first = [lines[0] for lines in axes]
    groups = [i for i, o in enumerate(overrides) if len(axes[i]) > 1 and not is_value(o)]
    values = [i for i, o in enumerate(overrides) if len(axes[i]) > 1 and is_value(o)]
    n_products = 1
    for i in groups:
        n_products *= len(axes[i])
    variants: list[tuple[list[str], list[str], str | None]] = []
    if n_products <= _MAX_JOBS_CHECKED:
        for combo in itertools.product(*[axes[i] for i in groups]):
            job = list(first)
            for i, line in zip(groups, combo):
                job[i] = line
            variants.append((job, list(combo), None))
    else:
        variants.append((first, [], None))
        for i in groups:
            for line in axes[i][1:]:
                job = list(first)
                job[i] = line
                variants.append((job, [line], None))
    for i in values:
        for line in axes[i][1:]:
            job = list(first)
            job[i] = line
            variants.append((job, [line], line))
    return variants


def precheck(argv: list[str]) -> list[str]:
    """Compose and validate the command line as Hydra will; return argv, possibly with
    ``+`` added to overrides of known keys that the primary config lacks.

    With ``-m``, every job of the sweep is validated (the sweeps on the command line and those of
    ``hydra.sweeper.params``, e.g. from a sweep file): each combination of config groups and every
    value once. ``sweep=<name>`` is read as ``+sweep=<name>``. When the Optuna sweeper is selected,
    overrides that fit it to clrun are added (:func:`cl_runner.sweeps.optuna_overrides`) and the
    folder of a SQLite storage is created.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
    from omegaconf import OmegaConf

    from cl_runner.config import validate_config
    from cl_runner.errors import ConfigError

    args, _ = get_args_parser().parse_known_args(argv)
    if any(flag in argv for flag in _HYDRA_FLAGS_WITHOUT_RUN) or args.cfg:
        return argv
    sweeps.register_sweep_files()
    config_dir = str(Path(args.config_dir).resolve()) if args.config_dir else CONF_DIR
    config_name = args.config_name or "config"
    argv = list(argv)
    overrides = list(args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return argv  # Hydra reports syntax errors itself
    groups = {p.name for d in {CONF_DIR, config_dir} for p in Path(d).iterdir() if p.is_dir()}
    file_groups = (sweeps.SWEEP_GROUP, sweeps.EXPECTED_GROUP)
    groups.update(file_groups)

    # The sweep and expected groups are not in the defaults list: `sweep=name` means `+sweep=name`.
    for o in parsed:
        if o.key_or_group in file_groups and not (o.is_add() or o.is_force_add() or o.is_delete()):
            argv[argv.index(o.input_line)] = "+" + o.input_line
            overrides[overrides.index(o.input_line)] = "+" + o.input_line
    parsed = OverridesParser.create().parse_overrides(overrides)
    for o in parsed:
        if o.key_or_group not in file_groups or o.is_delete():
            continue
        names = _concrete_lines(o) or []
        for name in (line.split("=", 1)[1] for line in names):
            if sweeps.broken_sweep_file(name, o.key_or_group):
                _fail(sweeps.broken_sweep_file(name, o.key_or_group))
        if o.key_or_group == sweeps.SWEEP_GROUP and not args.multirun:
            _fail(f"a sweep file runs several jobs: add -m, as in 'clrun -m {o.input_line}'.")

    def is_value(o) -> bool:
        key = o.key_or_group
        return not (o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra")
                    or key in groups or "/" in key)

    def compose_with(active: list[str], hydra_config: bool = False):
        GlobalHydra.instance().clear()
        extra = [] if config_dir == CONF_DIR else [f"hydra.searchpath=[file://{CONF_DIR}]"]
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name=config_name, overrides=active + extra,
                           return_hydra_config=hydra_config)

    def compose_job(lines: list[str], swept: list[str]):
        """The composed config of one job, or None when Hydra should report the problem."""
        try:
            return compose_with(lines)
        except MissingConfigException as ex:
            m = re.search(r"Could not find '(\w+)/([^']+)'", str(ex))
            if m:
                _unknown_group_option(m.group(1), m.group(2))
            return None
        except ConfigCompositionException:
            if swept:
                explain_job(lines, swept)
            raise

    def explain_job(lines: list[str], swept: list[str]) -> None:
        """Say which key of a sweep job does not exist, e.g. algo.ewc_lambda in algo=naive."""
        job = OverridesParser.create().parse_overrides(lines)
        job_base = compose_with([o.input_line for o in job if not is_value(o)])
        trial = OmegaConf.to_container(job_base, resolve=False)
        trial.pop("hydra", None)
        for o in job:
            if is_value(o) and not _has_path(job_base, o.key_or_group):
                _set_path(trial, o.key_or_group, o.value())
        try:
            validate_config(trial)
        except ConfigError as ex:
            job_error(ex, swept)

    def job_error(ex: ConfigError, swept: list[str]) -> None:
        where = f"in the sweep job {' '.join(swept)}: " if swept else ""
        _fail(f"{where}{ex}")

    def with_value(cfg, line: str):
        """``cfg`` with one more value override applied as Hydra applies it, or None."""
        o = OverridesParser.create().parse_overrides([line])[0]
        cfg = copy.deepcopy(cfg)
        try:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except Exception:  # noqa: BLE001 - compose the job instead, and let Hydra say what is wrong
            return None
        return cfg

    def first_line(o) -> str:
        lines = _concrete_lines(o)
        return lines[0] if lines else o.input_line

    try:
        base_lines = [first_line(o) for o in parsed if not is_value(o)]
        base = compose_job(base_lines, [])
        if base is None:
            return argv
        # The first value of each swept group made the base: name it when a key is wrong there.
        base_job = [first_line(o) for o in parsed if not is_value(o) and o.is_sweep_override()]
        for o in parsed:
            if not is_value(o) or _has_path(base, o.key_or_group):
                continue
            trial = OmegaConf.to_container(base, resolve=False)
            trial.pop("hydra", None)
            value = o.value()
            _set_path(trial, o.key_or_group, value if not o.is_sweep_override() else None)
            try:
                validate_config(trial)  # an unknown key raises a ConfigError naming the nearest one
            except ConfigError as ex:
                job_error(ex, base_job)
            # A key clrun knows but the primary config (e.g. a SequeL file) does not set: add it.
            argv[argv.index(o.input_line)] = "+" + o.input_line
        final = list(OverridesParser.create().parse_overrides(
            [a for a in argv if a in overrides or a.lstrip("+") in overrides]))

        sweeper = hydra_cfg = None
        if args.multirun:
            hydra_cfg = compose_with(base_lines, hydra_config=True)
            sweeper = OmegaConf.to_container(hydra_cfg.hydra.sweeper, resolve=False)
            # Sweeps of the sweeper's params (e.g. from a sweep file); the command line wins.
            on_command_line = {o.key_or_group for o in final}
            params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
            final += [o for o in OverridesParser.create().parse_overrides(params)
                      if o.key_or_group not in on_command_line]
        try:
            variants = _sweep_variants(final, is_value)
        except LookupError:
            variants = [([first_line(o) for o in final], [], None)]
        objective = sweeps.DEFAULT_OBJECTIVE
        first_job = None
        for lines, swept, value_line in variants:
            cfg = with_value(first_job, value_line) if value_line and first_job is not None else None
            if cfg is None:
                cfg = compose_job(lines, swept)
            if cfg is None:
                return argv
            if first_job is None:
                first_job = cfg
            try:
                validate_config(cfg)
                objective = cfg.get("objective", None) or sweeps.DEFAULT_OBJECTIVE
                sweeps.objective_direction(objective)
            except ConfigError as ex:
                job_error(ex, swept)

        if sweeps.is_optuna(sweeper):
            argv += _prepare_optuna(sweeper, objective, {o.key_or_group for o in parsed}, hydra_cfg)
        if not args.multirun:
            _check_run_dir(compose_with(base_lines, hydra_config=True))
    except ConfigError as ex:
        _fail(str(ex))
    except HydraException:
        return argv
    finally:
        GlobalHydra.instance().clear()
    return argv


def _check_run_dir(hydra_cfg) -> None:
    """Hydra creates hydra.run.dir before the task runs; check beforehand that it can, so the
    error is clrun's message rather than a traceback."""
    import os

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cl_runner.errors import ConfigError

    try:
        run_dir = OmegaConf.select(hydra_cfg, "hydra.run.dir")
    except OmegaConfBaseException:
        return
    if not run_dir:
        return
    target = Path(str(run_dir)).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    why = "is not a directory" if not existing.is_dir() else "is not writable"
    raise ConfigError(f"the output directory {target} is not writable ({existing} {why}). "
                      f"Choose another with hydra.run.dir=/some/writable/dir.")


def _prepare_optuna(sweeper: dict, objective: str, command_line_keys: set[str], hydra_cfg) -> list[str]:
    """Overrides that fit the Optuna sweeper to clrun (said on stderr), after creating the folder
    of a SQLite storage so that the first run of a study can create its database."""
    from omegaconf import OmegaConf

    extra = sweeps.optuna_overrides(sweeper, objective, command_line_keys)
    if extra:
        Console(stderr=True).print(f"[dim]clrun: Optuna sweeper with {' '.join(extra)} (objective "
                                   f"{objective}; set them on the command line to change)[/dim]",
                                   highlight=False)
    try:
        storage = OmegaConf.select(hydra_cfg, "hydra.sweeper.storage")
    except Exception:  # noqa: BLE001 - an interpolation only Hydra can resolve: leave it to Hydra
        storage = None
    path = sweeps.sqlite_path(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # SQLAlchemy 1.4 warns on import of Optuna's storage models that 2.0 would not accept them.
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
    try:  # Optuna's own lines ("Using an existing study ...") through Hydra's log, without colour codes
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
    except ImportError:
        pass  # Hydra says that the sweeper's plugin is missing
    return extra


def _unknown_group_option(group: str, option: str) -> None:
    from cl_runner import catalog
    from cl_runner.registry import ALGORITHMS, BACKBONES, BACKENDS, BENCHMARKS, OPTIMIZERS

    if group == sweeps.SWEEP_GROUP:
        from cl_runner.errors import did_you_mean

        names = list(sweeps.sweep_files())
        _fail(f"unknown sweep '{option}'.{did_you_mean(option, names)} Ready sweeps (in "
              f"{sweeps.SWEEPS_DIR}): {', '.join(names) or '(none)'}.")
    if group == sweeps.EXPECTED_GROUP:
        from cl_runner.errors import did_you_mean

        names = list(sweeps.expected_files())
        folders = ", ".join(str(d) for d in sweeps.expected_dirs())
        _fail(f"unknown experiment file '{option}'.{did_you_mean(option, names)} Experiment files "
              f"(in {folders}; ${sweeps.EXPECTED_DIRS_ENV} adds folders): {', '.join(names) or '(none)'}.")
    catalog.load()
    registry = {"algo": ALGORITHMS, "benchmark": BENCHMARKS, "backbone": BACKBONES,
                "optimizer": OPTIMIZERS, "backend": BACKENDS}.get(group)
    if registry is None:
        return
    try:
        registry.entry(option)
    except Exception as ex:  # noqa: BLE001
        _fail(f"{ex} (from the override {group}={option})")


def _task(cfg) -> float | None:
    """One job: run the experiment in Hydra's output directory and return its objective metric
    (``objective``, default avg_acc) for the sweeper. In a sweep, an error is raised to Hydra,
    which records the job as failed; a single run prints it and exits with status 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_runner.errors import ClrunError
    from cl_runner.experiment import run_experiment

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # Jobs side by side (joblib, submitit) share the machine's cores.
    cpu_count = sweeps.cpu_budget(hc.launcher) if multirun else None
    try:
        results = run_experiment(cfg, hc.runtime.output_dir, cpu_count=cpu_count)
    except ClrunError as ex:
        if multirun:
            raise  # the sweeper records the failed job
        _fail(str(ex))
        return None
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    objective = cfg.get("objective", None) or sweeps.DEFAULT_OBJECTIVE
    value = results.get(objective)
    return float(value) if value is not None else float("nan")


def main() -> None:
    argv = sys.argv[1:]
    if "--list" in argv:
        i = argv.index("--list")
        pattern = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "*"
        print_registry(pattern)
        return
    from cl_runner.errors import ConfigError

    try:
        sweeps.register_sweep_files()
    except ConfigError as ex:
        _fail(str(ex))
    # Optuna's SQLite storage imports alembic, which logs its setup at INFO through Hydra's handler.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    argv, rerun_dir = _rerun_option(argv)
    if rerun_dir is not None:
        _rerun(rerun_dir, argv)
        return
    argv = precheck(argv)
    sys.argv = [sys.argv[0], *argv]

    import hydra

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_task)()


def _rerun_option(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without ``--rerun <dir>`` (or ``--rerun=<dir>``), and that folder (None without it)."""
    for i, arg in enumerate(argv):
        if arg == "--rerun":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                _fail("--rerun needs the folder of a run, as in 'clrun --rerun outputs/2026-01-01/12-00-00'.")
            return argv[:i] + argv[i + 2:], argv[i + 1]
        if arg.startswith("--rerun="):
            return argv[:i] + argv[i + 1:], arg.split("=", 1)[1]
    return argv, None


def _rerun(run_dir: str, argv: list[str]) -> None:
    """``clrun --rerun <dir> [overrides]``: the saved config of a run as the primary config, in a
    new output folder (cl_runner/rerun.py)."""
    import hydra

    from cl_runner import rerun
    from cl_runner.errors import ConfigError

    def warn(text: str) -> None:
        Console(stderr=True).print(f"[bold yellow]warning:[/bold yellow] {text}", highlight=False)

    try:
        folder = rerun.prepare(run_dir, warn)
    except ConfigError as ex:
        _fail(str(ex))
        return
    sys.argv = [sys.argv[0], *argv]
    try:
        hydra.main(version_base="1.3", config_path=str(folder), config_name=rerun.CONFIG_NAME)(_task)()
    finally:
        rerun.cleanup(folder)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: jobs sent to other processes
    # (joblib, submitit) then refer to cl_runner.cli._task, which those processes can import.
    from cl_runner.cli import main as _main

    _main()
