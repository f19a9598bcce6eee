"""Running under ``torchrun``: process-group set-up and the few collectives training and prediction need.

A single process is the degenerate case (rank 0 of 1): every helper here is then a no-op, so the training loop
reads the same with and without DDP. torch is imported on first use, not with this module: ``cxr predict --backend
onnx`` uses these helpers and runs without torch (importing it takes seconds on a slow machine).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cxr.errors import CxrError, UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, and rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes logs, checkpoints and reports."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment variables (a single process when they are absent)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None


# The level the ranks other than rank 0 log from: above WARNING, below ERROR. A warning every rank finds alike (the
# unreadable images of the data they share) is said once, by rank 0, as README says: under WARNING, "2 unreadable
# image(s) skipped" had been said once per process. One about this process alone (its node's cache disk full, say) is
# logged at this level by own_warning, with its rank; errors are said by every rank. A name of its own: naming it
# WARNING as well made logging take "WARNING" for this level (caplog.at_level("WARNING") then missed warnings).
OWN_WARNING = logging.WARNING + 5
logging.addLevelName(OWN_WARNING, "RANK_WARNING")


def own_warning(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log a warning about this process alone, not one every rank finds alike: under torchrun every rank that has it
    says it (non-main ranks log from :data:`OWN_WARNING`), prefixed "rank N: "."""
    try:
        info = env_info()
    except UsageError:  # not a torchrun rank's environment: the warning is what matters here
        info = DistInfo()
    if info.active:
        logger.log(OWN_WARNING, f"rank {info.rank}: {msg}", *args, stacklevel=2)
    else:
        logger.warning(msg, *args, stacklevel=2)  # the record names its caller (data.py), not this function


def _started() -> bool:
    """Whether this process is in a process group. Without torch loaded it cannot be, so torch is not imported."""
    if "torch.distributed" not in sys.modules:
        return False
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except Exception:  # torch half-imported (a Ctrl-C during `import torch`): no group was started then
        return False


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun: NCCL on CUDA (one GPU per local rank), gloo on the CPU."""
    info = env_info()
    if not info.active:
        return info, device
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Ranks wait in a collective while local rank 0 builds the image cache alone (about 20 min per node for a
        # million images, SCALING.md) and while rank 0 alone averages and evaluates at the end: NCCL's default of
        # 10 minutes would abort them. CXR_DIST_TIMEOUT (seconds) sets it.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dist_timeout())
        global _OURS
        _OURS = True
    return info, device


def rank_device(name: str) -> str:
    """The ``--device`` a torchrun rank that predicts (``cxr predict``) uses: ``auto`` or ``cuda`` where CUDA is, its
    own GPU, ``cuda:LOCAL_RANK``, as training's ranks have. Every rank had predicted on GPU 0. Otherwise ``name``."""
    import torch

    info = env_info()
    if info.active and name in ("auto", "cuda") and torch.cuda.is_available():
        # More processes than GPUs on the node share them in turn ("auto" must not ask for a GPU that is not there).
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return name


# Whether this module started the process group: only such a group is torn down by shutdown(). A caller's own (a
# notebook that set one up, say) had been destroyed by every cxr.train.train, on success and on failure alike.
_OURS = False
# CXR_DIST_TIMEOUT's upper bound, more than any wait needs: 9.3e9 s had passed the check, then broken torch's store
# (its timeout is kept in milliseconds) with a C++ trace.
MAX_DIST_TIMEOUT = 7 * 24 * 3600


def dist_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective for the others: ``CXR_DIST_TIMEOUT`` seconds, default two hours."""
    raw = os.environ.get("CXR_DIST_TIMEOUT", "7200")
    try:
        seconds = float(raw)
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_DIST_TIMEOUT):
            raise ValueError
    except ValueError:
        raise UsageError(f"CXR_DIST_TIMEOUT={raw!r}: give a number of seconds above 0, at most "
                         f"{MAX_DIST_TIMEOUT:,} (a week)") from None
    return datetime.timedelta(seconds=seconds)


def shutdown(*, failed: bool = False) -> None:
    """Leave the process group (no-op without one).

    Every rank first waits for the others, so that no rank tears down its gloo connections while a peer is still
    using them: once in about ten 2-process CPU runs, a rank that left first died at exit with SIGABRT ("terminate
    called without an active exception"), after the run's files were all written. ``failed``: this rank stops on an
    error, and the others, waiting in some other collective, would never reach that barrier; it leaves at once.
    """
    global _OURS
    if _started() and _OURS:
        import torch.distributed as dist

        if not failed:
            with contextlib.suppress(Exception):  # a peer already gone: nothing left to wait for
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        _OURS = False


def barrier() -> None:
    if _started():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def local_main_first(info: DistInfo) -> Iterator[None]:
    """The node's local rank 0 runs the block first (e.g. builds the cache); the other ranks then reuse its work.

    A first rank that fails in the block (a dataset it cannot use, say) tells the others before it stops: they stop
    too, with one line pointing at its message, instead of a gloo or NCCL traceback when its connection drops.
    """
    if not info.active:
        yield
        return
    if info.local_rank != 0:
        if _any_rank(False):
            raise CxrError(f"rank {info.rank}: stopping, because a node's first rank could not prepare the data "
                           "(its error is above)")
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the others are told; this rank's own error is what gets reported
            _any_rank(True)
        raise
    if _any_rank(False):
        raise CxrError(f"rank {info.rank}: stopping, because another node's first rank could not prepare the data")


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank calls it once, where a barrier would be)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (in place; returns ``t``)."""
    if _started():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's ``values`` (as many on every rank), in rank order, on every rank; ``[values]`` without a group.

    Integers in a tensor, not pickled objects: every rank can compare what each prepared and so stop alike."""
    if not _started():
        return [values]
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    return [e.tolist() for e in every]


def broadcast_floats(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank, so decisions taken from them (early stopping) are the same everywhere."""
    if not _started():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()
