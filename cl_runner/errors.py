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
