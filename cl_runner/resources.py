"""Where clrun's own files are: the Hydra configs, the ready sweeps and the published-number files.

A checkout keeps them at its top level (``conf/``, ``sweeps/``, ``expected_results/``). The wheel
carries the same folders as package data inside ``cl_runner`` (``cl_runner/_conf``,
``cl_runner/_sweeps``, ``cl_runner/_expected``: setup.py maps these package names onto the
top-level folders). Everything that needs one of them asks this module, so ``clrun``, ``+sweep=``,
``+expected=`` and ``clrun-regress`` work from any working directory after a plain
``pip install``, and from the checkout itself (an editable install, or ``PYTHONPATH``).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# package-data folder inside cl_runner -> the folder at the checkout's top level
_FOLDERS = {"conf": ("_conf", "conf"), "sweeps": ("_sweeps", "sweeps"),
            "expected": ("_expected", "expected_results")}


def checkout_dir() -> Path | None:
    """The source checkout this package runs from (the folder holding pyproject.toml beside
    ``cl_runner/``), or None for an installed wheel."""
    root = PACKAGE_DIR.parent
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if 'name = "cl_runner"' in text else None


def _folder(kind: str) -> Path:
    packaged, top_level = _FOLDERS[kind]
    inside = PACKAGE_DIR / packaged
    if inside.is_dir():
        return inside
    root = checkout_dir()
    if root is not None and (root / top_level).is_dir():
        return root / top_level
    raise FileNotFoundError(
        f"clrun's {top_level}/ folder is missing: neither {inside} (an installed wheel) nor a "
        f"checkout's {top_level}/ beside {PACKAGE_DIR} exists. Reinstall clrun "
        f"(pip install --force-reinstall cl_runner), or run it from a complete checkout.")


#: The Hydra config folder (config.yaml and the groups benchmark, backbone, algo, optimizer, backend).
CONF_DIR: Path = _folder("conf")
#: The ready sweep files (options of the ``sweep`` group).
SWEEPS_DIR: Path = _folder("sweeps")
#: The published-number files (options of the ``expected`` group, run by clrun-regress).
EXPECTED_DIR: Path = _folder("expected")
