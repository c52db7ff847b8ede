"""``clrun --rerun <run dir>``: run a saved run's config again, exactly.

A run folder is a shareable artefact: its results.json holds the whole config as the run
resolved and validated it (``config``: every key, interpolations and environment variables
already filled in) and the versions it ran with (``versions``). A re-run takes that config as
its primary Hydra config (nothing of today's ``conf/`` defaults is composed into it, so a default
changed since does not leak in), runs it in a new output folder as any run, and warns on stderr
when clrun, torch or jax differ from the recorded versions. On the same machine with the same
versions it gives the same numbers (tests/test_rerun.py).

Which file is read, in this order:

* ``<dir>/results.json`` (the file a single run, or a job of a sweep, writes);
* ``<dir>/aggregate.json`` of a ``seeds=[...]`` run: the first seed's results.json config, with
  ``seeds`` set back to the seeds of the run;
* ``<dir>/.hydra/config.yaml`` (a run cut off before its results were written): Hydra's copy of
  the composed config, with interpolations such as ``${oc.env:CLRUN_DATA_DIR}`` resolved now,
  and no versions to compare.

Overrides after the folder apply to the saved config, e.g. ``clrun --rerun outputs/x
data_dir=/elsewhere/data hydra.run.dir=outputs/x_again``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from cl_runner.errors import ConfigError

#: The config name of the primary config a re-run writes.
CONFIG_NAME = "rerun"
#: The versions whose difference is worth a warning (they change the numbers).
COMPARED = ("clrun", "torch", "jax")


def _results_of(run_dir: Path) -> tuple[dict, dict | None, str]:
    """(config, recorded versions or None, which file) of the run in ``run_dir``."""
    results = run_dir / "results.json"
    if results.is_file():
        data = _read_json(results)
        if isinstance(data.get("config"), dict):
            return data["config"], data.get("versions"), str(results)
    aggregate = run_dir / "aggregate.json"
    if aggregate.is_file():
        data = _read_json(aggregate)
        seeds = data.get("seeds") or []
        runs = data.get("runs") or [f"seed={s}/results.json" for s in seeds]
        if seeds and runs and (run_dir / runs[0]).is_file():
            first = _read_json(run_dir / runs[0])
            config = dict(first["config"])
            config["seeds"], config["seed"] = [int(s) for s in seeds], int(seeds[0])
            return config, first.get("versions"), str(aggregate)
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(saved), resolve=True), None, str(saved)
    raise ConfigError(f"--rerun {run_dir}: no results.json, aggregate.json or .hydra/config.yaml there. "
                      f"Give the folder of a clrun run (the one holding its results.json).")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as ex:
        raise ConfigError(f"--rerun: {path} could not be read ({ex}).") from None


def version_differences(recorded: dict | None, backend: str) -> list[str]:
    """One line per version of :data:`COMPARED` that differs between ``recorded`` and now
    (jax only where the run's backend is jax, or where both sides have it)."""
    from cl_runner import versions

    if not recorded:
        return []
    now = versions.collect()
    try:  # as results.json records it (the torch backend's versions(): torch.__version__, local tag included)
        import torch

        now["torch"] = torch.__version__
    except ImportError:
        pass
    lines = []
    for name in COMPARED:
        was, is_ = recorded.get(name), now.get(name)
        if name == "jax" and backend != "jax" and (was is None or is_ is None):
            continue
        if was != is_:
            lines.append(f"{name} {was or 'not installed'} then, {is_ or 'not installed'} now")
    return lines


def prepare(run_dir: str, warn) -> Path:
    """Write the saved config of ``run_dir`` as a primary config ``rerun.yaml`` in a new
    temporary folder (returned: the caller removes it), with clrun's ``hydra:`` settings (the
    output folders). ``warn(text)`` is called with the version warning, if any."""
    from omegaconf import OmegaConf

    from cl_runner.resources import CONF_DIR

    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--rerun {run_dir}: no such folder. Give the folder of a clrun run "
                          f"(the one holding its results.json).")
    config, recorded, source = _results_of(folder)
    backend = (config.get("backend") or {}).get("name", "torch")
    differences = version_differences(recorded, backend)
    if differences:
        warn(f"re-running {source} with other versions than it ran with ({'; '.join(differences)}): "
             f"the numbers may differ from the recorded ones.")
    elif recorded is None:
        warn(f"re-running {source}: the run recorded no versions to compare.")
    node = OmegaConf.create(config)
    node.hydra = OmegaConf.load(CONF_DIR / "config.yaml").hydra
    out = Path(tempfile.mkdtemp(prefix="clrun-rerun-"))
    (out / f"{CONFIG_NAME}.yaml").write_text(OmegaConf.to_yaml(node))
    return out


def cleanup(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
