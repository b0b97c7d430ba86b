"""The run-level job behind ``somprobe connect``: pairs → spaces → methods → tables.

Methods are looked up in :data:`METHODS` by their ``--method`` name; a new path method
registers itself there with the keyword options it takes from the job and any extra columns it
adds to ``paths.csv``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .linear import find_linear

__all__ = ["MethodSpec", "METHODS", "register_method", "PATHS_COLUMNS"]

#: Common columns of ``paths.csv`` (method-specific extras follow them).
PATHS_COLUMNS = [
    "pair", "id_a", "id_b", "class", "space", "method", "linear_ok", "path_ok", "max_loss",
    "length_ratio", "iterations", "seconds", "failed", "reason",
]


@dataclass(frozen=True)
class MethodSpec:
    """A path method as the job sees it.

    Attributes
    ----------
    fn : callable
        ``fn(space, a, b, target, *, <options>, generator=None, progress=False) -> PathBatch``.
    options : dict
        Keyword options the method takes, mapped to their defaults; the job passes the value
        the user gave (``connect_run(..., options={...})`` / CLI flags) or this default.
    extras : tuple of str
        Extra per-pair ``stats`` columns copied into ``paths.csv``.
    check : bool
        Re-check the returned path densely with :func:`~somprobe.paths.core.check_paths`
        (the job then takes ``path_ok``, ``max_loss`` and ``length_ratio`` from the check).
    description : str
        One line for ``--help``.
    """

    fn: Callable
    options: dict = field(default_factory=dict)
    extras: tuple = ()
    check: bool = True
    description: str = ""


#: ``--method`` name → method.
METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, spec: MethodSpec) -> None:
    """Make ``spec`` available as ``--method name`` (replaces a method of the same name)."""
    METHODS[name] = spec


register_method("linear", MethodSpec(
    find_linear, options={"points": 100}, check=False,
    description="straight line, checked at --points points (linearly connectable)"))
