"""Run the ``cxr`` command with one fault injected: SIGKILL at a chosen point. Test-only (see test_crash_resume.py).

    python tests/crash_driver.py KILL_AT [cxr arguments...]

KILL_AT is one of:

* ``cache:N``          while writing the Nth image-cache pack of this process: half of it is on disk (under its
                       temporary name), then SIGKILL;
* ``step:N``           just before this process's Nth optimiser step (mid-epoch);
* ``save:NAME:K``      during the Kth write of NAME (``best.pt``, ``last.pt``...) by this process: half the bytes
                       are in the temporary file the library opened, then SIGKILL;
* ``replace:NAME:K``   just before the Kth ``os.replace`` onto a file called NAME (the complete temporary file is on
                       disk, not yet renamed);
* ``none``             no fault.

The whole process group is killed (the trainer and any cache worker), as the kernel's OOM killer or a lost node would
do it, so the driver must lead its own group: start it with ``start_new_session=True``; it refuses to run otherwise.
Nothing here changes the library: the hooks are monkeypatches in this process only.

``python tests/crash_driver.py --serve`` imports everything once, then runs each request it reads on stdin (one JSON
line: ``{"kill_at": ..., "argv": [...], "env": {...}, "log": PATH}``) in a forked child that leads its own process
group, and answers one JSON line ``{"status": N}`` (negative: killed by that signal). This saves the tests an
interpreter start and a torch import per run (seconds each); the child is a copy of a process that has only imported
modules, as a forkserver's children are.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

LEADER = os.getpid()


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(LEADER, signal.SIGKILL)  # also from a forked cache worker: LEADER is inherited


def _half_write(file, data: bytes) -> None:
    file.write(data[: len(data) // 2])
    file.flush()
    os.fsync(file.fileno())


def install(kill_at: str) -> None:
    """Install the hook named by ``kill_at`` (see the module docstring)."""
    kind, _, arg = kill_at.partition(":")
    if kind == "none":
        return
    if kind == "cache":
        import numpy as np

        real_save, seen = np.save, [0]

        def save(file, arr, *args, **kwargs):
            seen[0] += 1
            if seen[0] == int(arg):
                buf = io.BytesIO()
                real_save(buf, arr, *args, **kwargs)
                _half_write(file, buf.getvalue())
                _die()
            return real_save(file, arr, *args, **kwargs)

        np.save = save
    elif kind == "step":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        steps = [0]

        def before_step(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == int(arg):
                _die()

        register_optimizer_step_pre_hook(before_step)
    elif kind == "save":
        import builtins

        name, k = arg.split(":")
        real_open, seen = builtins.open, [0]

        class _DyingFile(io.FileIO):
            def write(self, data) -> int:
                data = bytes(data)
                super().write(data[: len(data) // 2])
                os.fsync(self.fileno())
                _die()
                return len(data)

        def open_(file, mode="r", *args, **kwargs):
            # atomic_path's temporary file for NAME is ".NAME.<random>.tmp"
            target = Path(file).name if isinstance(file, str | os.PathLike) else ""
            if "w" in mode and target.startswith(f".{name}.") and target.endswith(".tmp"):
                seen[0] += 1
                if seen[0] == int(k):
                    return _DyingFile(file, "w")
            return real_open(file, mode, *args, **kwargs)

        builtins.open = open_
    elif kind == "replace":
        name, k = arg.split(":")
        real_replace, seen = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == name:
                seen[0] += 1
                if seen[0] == int(k):
                    _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise SystemExit(f"crash_driver: unknown KILL_AT {kill_at!r}")


def _run(argv: list[str]) -> int:
    from cxr.cli import main as cxr_main

    install(argv[0])
    return cxr_main(argv[1:])


def serve() -> None:
    """Answer run requests from stdin, each in a forked child (see the module docstring)."""
    global LEADER
    import sklearn.metrics  # noqa: F401 - imported once here, inherited by every child
    import sklearn.model_selection  # noqa: F401
    import torchvision  # noqa: F401

    import cxr.cli  # noqa: F401
    import cxr.evaluate  # noqa: F401
    import cxr.train  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: its own process group, its own log, never returns
            status = 1
            try:
                os.setpgid(0, 0)
                LEADER = os.getpid()
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(request.get("env", {}))
                status = _run([request["kill_at"], *request["argv"]])
            except BaseException as e:  # noqa: BLE001 - reported through the log and the status
                print(f"crash_driver child: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status if isinstance(status, int) else 1)
        _, wait_status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}), flush=True)


def main(argv: list[str]) -> int:
    if os.getpgid(0) != LEADER:
        raise SystemExit("crash_driver: not a process-group leader; start it with start_new_session=True")
    if argv[:1] == ["--serve"]:
        serve()
        return 0
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
