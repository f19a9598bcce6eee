"""Atomic writes: a file is either the old one or the complete new one, never half-written."""

from __future__ import annotations

import contextlib
import errno
import logging
import numbers
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cxr.errors import FolderInUse, UsageError, WriteError

log = logging.getLogger(__name__)

_TEMP_SUFFIX = ".tmp"
# What an output file's name may take, in bytes: 255 (NAME_MAX of common file systems) less room for a temporary
# name around it (.NAME.<random>.tmp) and a suffix.
MAX_NAME_BYTES = 230
# How cxr opens its CSV files (split.csv, predictions, explanations, history), for writing and reading: UTF-8
# wherever the locale says otherwise, and a file name that is not valid UTF-8 (bytes from another system's encoding)
# written as its own bytes and read back as the same name, instead of ending the run after its last prediction.
CSV_TEXT = {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}
# Reading: a byte-order mark (Excel's "CSV UTF-8" writes one) is no part of the first column's name.
CSV_READ = {**CSV_TEXT, "encoding": "utf-8-sig"}


def valid_utf8(text: str) -> str:
    """``text`` with bytes that were not valid UTF-8 (a path from another system's encoding) shown as escapes
    (``\\udcc4``), so that it can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shorten_middle(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters: its start and its end with an ellipsis between, so that names that
    differ only at their start (or only at their end) stay apart where they are drawn."""
    if len(text) <= n:
        return text
    head = (n - 1) // 2
    return text[:head] + "…" + text[len(text) - (n - 1 - head):]


def display_name(text: str) -> str:
    """A file name fit to draw or print: undecodable bytes (:func:`valid_utf8`) and characters that are not printable
    shown as escapes: control codes such as ESC (terminal colours, titles, a cleared screen) or a newline (a forged log
    line), and bidirectional overrides (``\\x1b``, ``\\n``, ``\\u202e``)."""
    text = valid_utf8(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def check_paths(**named: object) -> None:
    """A :class:`UsageError` for each argument that should name a file or folder and does not (``None``, bytes, a
    PIL image), naming its type: pathlib's TypeError had come out of the library's functions instead."""
    for name, value in named.items():
        if not isinstance(value, (str, os.PathLike)):
            raise UsageError(f"{name}: a path (str or os.PathLike), got {type(value).__name__}")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes Excel or LibreOffice read a cell as a formula


def _head(name: str, max_bytes: int) -> str:
    """The start of ``name`` that takes at most ``max_bytes`` in the file system's encoding, whole characters only."""
    if len(os.fsencode(name)) <= max_bytes:
        return name
    kept, used = [], 0
    for c in name:
        used += len(os.fsencode(c))
        if used > max_bytes:
            break
        kept.append(c)
    return "".join(kept)


def fit_name(stem: str, suffix: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``stem + suffix``, the stem cut (at a character's boundary) so that the whole takes at most ``max_bytes``: a
    file named after an input of 240 bytes, plus a suffix, could not be written (File name too long)."""
    return _head(stem, max_bytes - len(os.fsencode(suffix))) + suffix


def spreadsheet_cells(path: str, *texts: str) -> list[str]:
    """A CSV row's ``path`` and other ``texts`` that a spreadsheet shows as text, never runs as a formula (a file
    named ``=HYPERLINK("http://...").jpeg``). The path becomes ``./path``, the same file; a text that begins with
    the path gets the same prefix, and any other text that begins like a formula a leading ``'``."""
    safe = "./" + path if path.startswith(FORMULA_START) else path
    out = [safe]
    for text in texts:
        if safe != path and text.startswith(path):
            text = safe + text[len(path):]
        elif text.startswith(FORMULA_START):
            text = "'" + text
        out.append(text)
    return out


def _breaks(text: str) -> bool:
    return "\n" in text or "\r" in text


class PrintableFormatter(logging.Formatter):
    """Log lines whose control characters (from file names in the messages) are shown as escapes, not obeyed by the
    terminal; line breaks and tabs of the messages' own templates are kept, those of their arguments escaped (a file
    named ``bad\nINFO fake.jpeg`` had printed a forged log line)."""

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, tuple):  # strings, paths and errors (an ImageError names its file); numbers as they are
            record.args = tuple(a if isinstance(a, numbers.Number) or not _breaks(str(a)) else display_name(str(a))
                                for a in args)
        try:
            lines = super().format(record).split("\n")
        finally:
            record.args = args  # other handlers of the record see it as it was
        return "\n".join(display_name(line.replace("\t", "    ")) for line in lines)


def npz_row(path: str | os.PathLike) -> tuple[str, str, int] | None:
    """``(file, split, index)`` of a row of an ``.npz`` as :func:`cxr.data.scan` names it (``/data/x.npz#test/3``),
    else None. The last ``#`` parts them: a folder's name may hold one (``ds#1/x.npz#test/3``), which the report had
    split at and so showed none of the file's images."""
    head, sep, row = str(path).rpartition("#")
    m = re.fullmatch(r"([^/\\]+)/(\d+)", row)
    if sep and head.lower().endswith(".npz") and m:
        return head, m[1], int(m[2])
    return None


def image_name(path: str) -> str:
    """What names an image in a picture: its file's name, or for a row of an ``.npz`` (``/data/x.npz#test/3``, as
    :func:`cxr.data.scan` names it) the file's name and the row, ``x.npz#test/3``, not a bare ``3``."""
    row = npz_row(path)
    if row is not None:
        return display_name(f"{Path(row[0]).name}#{row[1]}/{row[2]}")
    return display_name(Path(path).name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it, ``os.replace`` it onto ``path``, fsync the folder.
    A ``path`` that is a symbolic link is written where it points (the link stays).

    The folder's fsync makes the rename itself durable, so after a power cut ``path`` is the old file or the new one.

    ``fsync=False`` skips the flush to disk (still atomic against a killed process, not against a power cut): for
    files that are cheap to rebuild.

    On any error the temporary file is removed and ``path`` is left as it was. An ``OSError`` (disk full,
    read-only file system, no permission) comes out as :class:`~cxr.errors.WriteError`, which names ``path``.
    A process killed mid-write leaves only the hidden temporary file (``.NAME.*.tmp``), never a partial ``path``.
    """
    target = Path(path)
    if target.is_symlink():  # written where the link points, as open(path, "w") writes: the link itself had been
        target = Path(os.path.realpath(target))  # replaced by a file, and what it pointed to kept its old contents
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_head(target.name, 200)}.", suffix=_TEMP_SUFFIX, dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise WriteError.from_os_error(target, e) from e
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        yield Path(tmp)
        if fsync:
            _fsync_file(tmp)
        _replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError.from_os_error(target, e) from e
        raise


def _replace(tmp: str, target: Path) -> None:
    """``os.replace``; on Windows, retried for a few seconds while another program holds ``target`` open (a CSV in
    Excel, a virus scanner's look at a new file), and then said so: it refuses the rename there (WinError 5 or 32)."""
    for attempt in range(_REPLACE_TRIES):
        try:
            os.replace(tmp, target)
            return
        except PermissionError as e:
            if sys.platform != "win32":
                raise
            if attempt == _REPLACE_TRIES - 1:
                raise PermissionError(e.errno, f"{e.strerror or e} (is it open in another program? close it and run "
                                               "again)", str(target)) from e
            time.sleep(0.5)


_REPLACE_TRIES = 10


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what creating it would create."""
    missing = []
    for p in (Path(folder), *Path(folder).parents):
        if os.path.lexists(p):  # never raises (Path.exists does, on EACCES, before Python 3.12)
            break
        missing.append(p)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they are still empty; keep any that something was written into."""
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()


def _fsync_file(path: str) -> None:
    """Flush a written file to the disk. Opened for writing: on Windows ``os.fsync`` is ``_commit``, which fails with
    EBADF on a descriptor opened read-only (and every output of cxr had been "cannot write ...: Bad file
    descriptor"); read-only only where writing is refused (POSIX flushes such a descriptor too)."""
    binary = getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, os.O_RDWR | binary)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | binary)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Fail now, before the work, where the output ``path`` (a file, or a ``folder``) could not be written later.

    Creates the folder (or the file's folder) and a temporary file in it, then removes the file and the folders it
    created, so that a run that fails later leaves no empty output folder behind (the writers create their folders
    again). An ``OSError`` comes out as :class:`~cxr.errors.WriteError`, naming ``path``. An empty ``path`` is a
    :class:`~cxr.errors.UsageError`: ``Path("")`` is the current folder, where results would be written unasked.
    """
    if not os.fspath(path):
        raise UsageError("the output path is empty: give a folder or file name")
    target = Path(path)
    where = target if folder else target.parent
    created = missing_folders(where)
    try:
        if not folder and target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder is there, not a file")
        existing = next((p for p in (where, *where.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():  # mkdir would say only "File exists"
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        for attempt in range(5):
            try:
                where.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".cxr-write-check.", suffix=_TEMP_SUFFIX, dir=where)
                break
            # Another probe (a torchrun shard, another thread's call) removed the folder just now: between mkstemp's
            # look and its file, or between mkdir's EEXIST and its own look (FileExistsError, "File exists", which
            # two threads explaining into one new folder had met)
            except (FileNotFoundError, FileExistsError):
                if attempt == 4:
                    raise
        try:
            # A byte, not an empty file, and the file system's free blocks: a full disk allows an empty file, and
            # predict and evaluate had done all their work before they failed to write the results.
            os.write(fd, b"\0")
            if hasattr(os, "statvfs"):
                space = os.statvfs(where)
                if space.f_blocks > 0 and space.f_bfree == 0:  # ramfs and unlimited tmpfs count no blocks at all
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        error = WriteError.from_os_error(target, e)
        error.replacing = False
        raise error from e
    finally:
        remove_empty_folders(created)
    return target


def check_free_space(path: str | os.PathLike, need: int) -> None:
    """Fail now where the folder of the output file ``path`` has less than ``need`` bytes free (for whoever runs
    this, not counting the blocks kept for root), with a :class:`~cxr.errors.WriteError` saying both. A nearly full disk
    had passed :func:`check_writable`'s one byte, and a 20-hour ``cxr predict`` was lost when its results did not fit.
    File systems that count no blocks (ramfs, an unlimited tmpfs) are not judged."""
    where = Path(path).parent
    if not hasattr(os, "statvfs"):
        return
    try:
        space = os.statvfs(where)
    except OSError:
        return  # said by the write itself
    free = space.f_bavail * space.f_frsize
    if space.f_blocks > 0 and free < need:
        error = WriteError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the results need about "
                                         f"{_size(need)} and {_size(free)} are free there", str(path))
        error.replacing = False
        raise error


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB" if n >= 1000 else f"{n} bytes"


def check_not_an_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "--output") -> None:
    """Refuse an output file that is one of the inputs: it would be replaced by the results (a checkpoint exported
    over itself, an image overwritten by the predictions file), and the input lost."""
    out = Path(output)
    if not out.exists():
        return  # not there yet, so no input
    names = {out.name.casefold(), Path(os.path.realpath(out)).name.casefold()}  # macOS and Windows ignore case
    for given in inputs:
        path = Path(given)
        # Only a file of the output's name (or its link's target's) is compared: a stat of every input is a crawl.
        if path.name.casefold() in names:
            with contextlib.suppress(OSError):
                if os.path.samefile(path, out):
                    raise UsageError(f"{flag} {out}: that is an input ({path}), which the results would replace; "
                                     "give another file name")


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if needed; an ``OSError`` comes out as WriteError."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError.from_os_error(folder, e) from e
    return folder


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` leaves when a process is killed mid-write.

    Only for a folder no other process is writing to (a run directory being resumed), never a shared cache.
    Returns the files removed.
    """
    removed = []
    for p in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        if not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (POSIX). Best effort: where a folder cannot be opened or synced (Windows, some
    network file systems), the file itself was already synced and the rename is as durable as that system makes it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux: ``/proc/self/status``).
    Setting it to 0 and back, as the fallback must, had made the files other threads created in that instant group-
    and world-writable (a notebook's, or a DataLoader thread's)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# How a file system without advisory locks answers flock (some network file systems)
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


def try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` (created if need be) holding its exclusive advisory lock, or None where another process
    holds it. Opened read-only on POSIX (``flock`` needs no write access: a lock file made by a colleague's umask 022
    had been no lock at all). An OSError where no lock can be had here."""
    if sys.platform == "win32":
        import msvcrt

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EDEADLK):
                return None
            raise
        return fd
    import fcntl

    for _ in range(10):
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise
        # The file locked must still be the lock file: a holder that ends removes it, and a process that had opened
        # it just before could lock the removed file while a third made a new one (two holders at once; a review's
        # race test found 16,402 such moments in 15 s of three processes).
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the lock file kept changing", str(path))


def release_lock(fd: int, path: Path | None = None) -> None:
    """Give up a lock of :func:`try_lock`, and remove its file (``path``) where given. On Windows the lock is undone
    before the close (Microsoft: a lock left to the close is released "depending upon available system resources",
    so a run started just after could be refused), and the file removed after it (an open file cannot be removed
    there: every run folder had kept its lock file)."""
    if sys.platform == "win32":
        import msvcrt

        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        return
    if path is not None:  # removed while still held, then released: no other process can take the old file meanwhile
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not another holder's, made after this one was removed
                path.unlink()
    os.close(fd)


# The output locks this process holds, by thread: (thread, real path) -> (descriptor, depth). Per thread, not per
# process: a second thread had been let into a folder the first held, and its lock removed under it.
_HELD: dict[tuple[int, str], tuple[int, int]] = {}
OUTPUT_LOCK = ".cxr-output.lock"


def held_lock_descriptors() -> list[int]:
    """The descriptors of the output locks this process holds (a forked worker closes its copies)."""
    return [fd for fd, _ in _HELD.values() if fd >= 0]


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "cxr evaluate or cxr report") -> Iterator[None]:
    """Hold ``folder`` for writing cxr's results into it: another ``cxr evaluate`` or ``cxr report`` into it meanwhile
    is refused (a UsageError), as a second ``cxr train`` into a run folder is. Two at once had left one model's
    metrics.json beside the other's predictions and report, each saying only "wrote". Held again by this process
    (evaluate, then its report) it nests. On a file system without locks the work goes on, said."""
    import threading

    folder = Path(folder)
    key = (threading.get_ident(), os.path.realpath(folder))
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    made = missing_folders(folder)
    ensure_dir(folder)
    path = folder / OUTPUT_LOCK
    try:
        fd = try_lock(path)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            remove_empty_folders(made)
            if path.exists() and e.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(f"{folder}: its lock file {path.name} is another user's and cannot be opened here "
                                 f"({e.strerror}), so whether a cxr writes there cannot be told; if none does, "
                                 f"delete {path}") from None
            raise WriteError.from_os_error(path, e) from None
        log.warning("%s: no lock on the folder (%s); do not write into it from another cxr meanwhile", folder,
                    e.strerror or e)
        fd = -1
    if fd is None:
        remove_empty_folders(made)
        raise FolderInUse(f"{folder} is in use by another {what} (it holds {path}); wait for it to end, or give "
                          "another folder")
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        _HELD.pop(key, None)
        if fd >= 0:
            release_lock(fd, path)
        remove_empty_folders(made)  # an evaluation that failed before writing anything leaves no folder of its own
