"""Errors a person can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class CxrError(Exception):
    """Base class: the message names the file or setting and what is wrong with it."""

    exit_code = 1


class UsageError(CxrError):
    """Wrong usage: a flag, a path or a config value that cannot work."""

    exit_code = 2


class DataError(CxrError):
    """A dataset that cannot be used as given (missing class folder, one class only, no readable images)."""

    exit_code = 2


class CheckpointError(CxrError):
    """A file given as a model that is not a cxr checkpoint, or is damaged."""

    exit_code = 2
