"""Exceptions that carry a message meant for the person running an experiment.

Every error raised for bad input is a :class:`ClrunError`; the command line prints its message
without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ClrunError(Exception):
    """An error whose message names the problem and how to fix it."""


class ConfigError(ClrunError):
    """The configuration is invalid (unknown key, wrong type, unknown name, bad combination)."""


class DataError(ClrunError):
    """A data file is missing, unreadable or corrupt."""


class TrainingDivergedError(ClrunError):
    """The loss became NaN or infinite."""


class CheckpointError(ClrunError):
    """A checkpoint is corrupt or does not belong to this configuration."""


class CheckpointExistsError(CheckpointError):
    """A run would replace the checkpoint of an earlier run in its folder."""


class Terminated(KeyboardInterrupt):
    """The run was stopped by SIGTERM (a scheduler ending the job); handled like Ctrl-C."""


class WriteError(ClrunError, OSError):
    """A file of the run could not be written (full disk, read-only folder, ...). Also an
    OSError, so code that tolerates failed writes (a read-only cache) keeps doing so."""

    def __init__(self, message: str, errno: int | None = None):
        OSError.__init__(self, errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def yaml_error_message(ex: Exception, path=None) -> str:
    """A YAML syntax error as one line naming the file, line and column (1-based) and the fix."""
    mark = getattr(ex, "problem_mark", None)
    problem = getattr(ex, "problem", None) or str(ex).splitlines()[0]
    where = ""
    if mark is not None:
        name = path or getattr(mark, "name", None) or "a config file"
        where = f"{name}, line {mark.line + 1}, column {mark.column + 1}"
    elif path:
        where = str(path)
    context, cmark = getattr(ex, "context", None), getattr(ex, "context_mark", None)
    started = f" ({context} started at line {cmark.line + 1}, column {cmark.column + 1})" if context and cmark else ""
    return f"YAML syntax error in {where or 'a config file'}: {problem}{started}. Fix the file and run again."


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``name``, or None when nothing is reasonably close."""
    cands = list(candidates)
    match = difflib.get_close_matches(name, cands, n=1, cutoff=0.5)
    if match:
        return match[0]
    lowered = {c.lower(): c for c in cands}
    if name.lower() in lowered:
        return lowered[name.lower()]
    for c in cands:
        if name and (name in c or c in name):
            return c
    return None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    best = closest(name, candidates)
    return f" Did you mean '{best}'?" if best else ""
