"""The ``clrun`` command: a Hydra application over ``conf/``.

Before Hydra starts, the command-line overrides are composed once and validated, so a typo or a
wrong type is reported with the nearest valid key (Hydra alone would only say the key is not in
the config). Keys that clrun knows but a shared experiment file does not set (e.g. ``data_dir``
with a SequeL-format file) are added rather than rejected.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from rich.console import Console

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

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


def precheck(argv: list[str]) -> list[str]:
    """Compose and validate the command line as Hydra will; return argv, possibly with
    ``+`` added to overrides of known keys that the primary config lacks."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf

    from cl_runner.config import validate_config
    from cl_runner.errors import ConfigError

    args, _ = get_args_parser().parse_known_args(argv)
    if any(flag in argv for flag in _HYDRA_FLAGS_WITHOUT_RUN) or args.cfg:
        return argv
    config_dir = str(Path(args.config_dir).resolve()) if args.config_dir else CONF_DIR
    config_name = args.config_name or "config"
    overrides = list(args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return argv  # Hydra reports syntax errors itself
    groups = {p.name for d in {CONF_DIR, config_dir} for p in Path(d).iterdir() if p.is_dir()}

    def is_value(o) -> bool:
        key = o.key_or_group
        return not (o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra")
                    or key in groups or "/" in key)

    def compose_with(active: list[str]):
        GlobalHydra.instance().clear()
        extra = [] if config_dir == CONF_DIR else [f"hydra.searchpath=[file://{CONF_DIR}]"]
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name=config_name, overrides=active + extra)

    def first_line(o) -> str:
        if not o.is_sweep_override():
            return o.input_line
        values = list(o.sweep_string_iterator())
        return f"{o.get_key_element()}={values[0]}" if values else o.input_line

    argv = list(argv)
    try:
        base_lines = [first_line(o) for o in parsed if not is_value(o)]
        try:
            base = compose_with(base_lines)
        except MissingConfigException as ex:
            m = re.search(r"Could not find '(\w+)/([^']+)'", str(ex))
            if m:
                _unknown_group_option(m.group(1), m.group(2))
            return argv
        for o in parsed:
            if not is_value(o) or _has_path(base, o.key_or_group):
                continue
            trial = OmegaConf.to_container(base, resolve=False)
            trial.pop("hydra", None)
            value = o.value()
            _set_path(trial, o.key_or_group, value if not o.is_sweep_override() else None)
            validate_config(trial)  # an unknown key raises a ConfigError naming the nearest one
            # A key clrun knows but the primary config (e.g. a SequeL file) does not set: add it.
            argv[argv.index(o.input_line)] = "+" + o.input_line
        final = OverridesParser.create().parse_overrides(
            [a for a in argv if a in overrides or a.lstrip("+") in overrides])
        validate_config(compose_with([first_line(o) for o in final]))
    except ConfigError as ex:
        _fail(str(ex))
    except HydraException:
        return argv
    finally:
        GlobalHydra.instance().clear()
    return argv


def _unknown_group_option(group: str, option: str) -> None:
    from cl_runner import catalog
    from cl_runner.registry import ALGORITHMS, BACKBONES, BACKENDS, BENCHMARKS, OPTIMIZERS

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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_runner.errors import ClrunError
    from cl_runner.experiment import run_experiment

    hc = HydraConfig.get()
    try:
        results = run_experiment(cfg, hc.runtime.output_dir)
    except ClrunError as ex:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed job
        _fail(str(ex))
        return None
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    objective = cfg.get("objective", None) or "avg_acc"
    value = results.get(objective)
    return float(value) if value is not None else None


def main() -> None:
    argv = sys.argv[1:]
    if "--list" in argv:
        i = argv.index("--list")
        pattern = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "*"
        print_registry(pattern)
        return
    argv = precheck(argv)
    sys.argv = [sys.argv[0], *argv]

    import hydra

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_task)()


if __name__ == "__main__":
    main()
