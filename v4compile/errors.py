"""Typed errors for user input (STYLE.md item 8): every message names the offending value and what was expected."""

from __future__ import annotations


class V4Error(Exception):
    """Base class of every error v4compile raises on purpose."""

    exit_code = 2


class ConfigError(V4Error, ValueError):
    """An impossible or unsupported model configuration (names the field and the value)."""


class CheckpointError(V4Error):
    """A checkpoint that does not match the configuration or the official format."""


class EngineError(V4Error):
    """An engine directory that is missing, modified, or built for another machine / format."""


class InputError(V4Error, ValueError):
    """Bad runtime input: token ids out of range, sequence past max length, wrong shapes or dtypes."""


class ParityError(V4Error):
    """Engine and reference disagree beyond the tolerance table."""

    exit_code = 1


class UnsupportedOpError(V4Error):
    """A graph node no kernel of the chosen target can implement (lists every such node)."""

    exit_code = 3


class ExportError(V4Error):
    """torch.export failed; names the module and the reason."""

    exit_code = 3


class TargetError(V4Error):
    """An unknown target, or a machine that does not match it (e.g. no CUDA GPU for h200)."""

    exit_code = 3
