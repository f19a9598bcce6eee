"""Errors a person can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class CxrError(Exception):
    """Base class: the message names the file or setting and what is wrong with it."""

    exit_code = 1


class UsageError(CxrError):
    """Wrong usage: a flag, a path or a config value that cannot work."""

    exit_code = 2


class ConfigError(UsageError):
    """Flags or config values that cannot work: every torchrun process finds them alike, so the first alone says so."""


class FolderInUse(UsageError):
    """A folder another cxr process is writing its results into (its lock is held)."""


class DataError(CxrError):
    """A dataset that cannot be used as given (missing class folder, one class only, no readable images)."""

    exit_code = 2


class CheckpointError(CxrError):
    """A file given as a model that is not a cxr checkpoint, or is damaged."""

    exit_code = 2


class WriteError(CxrError, OSError):
    """An output could not be written (disk full, read-only file system, no permission).

    Raised by :mod:`cxr.fileio`, whose writes are atomic: the file it was replacing, if any, is unchanged. Also an
    ``OSError`` (with the cause's ``errno``), so code that catches ``OSError`` still does.
    """

    exit_code = 1

    def __init__(self, errno: int | None, reason: str, path: str) -> None:  # OSError's order, so it pickles
        super().__init__(errno, reason, path)

    replacing = True  # False for cxr.fileio.check_writable's probe, made before any output exists

    def __str__(self) -> str:
        reason = self.strerror or "write failed"
        kept = "; the existing file, if any, is unchanged" if self.replacing else ""
        return f"cannot write {self.filename}: {reason}{kept}"

    @classmethod
    def from_os_error(cls, path: str | object, e: OSError) -> WriteError:
        """The cause's errno and message, for ``path``."""
        return cls(e.errno, e.strerror or str(e) or type(e).__name__, str(path))


class VideoError(CxrError):
    """The video could not be encoded (no ffmpeg, no H.264 encoder, or ffmpeg stopped); the rest of a report can be."""

    exit_code = 1
