"""Compilation targets: capability tables, kernel selection, emit."""

from __future__ import annotations

from v4compile.errors import TargetError
from v4compile.targets.base import Target, check_machine, machine_arch
from v4compile.targets.cpu import CPU
from v4compile.targets.h100 import H100
from v4compile.targets.h200 import H200

TARGETS: dict[str, Target] = {t.name: t for t in (CPU, H100, H200)}


def get_target(name: str | Target) -> Target:
    """The Target called `name`; TargetError (exit 3) listing the known ones otherwise."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["Target", "TARGETS", "get_target", "check_machine", "machine_arch"]
