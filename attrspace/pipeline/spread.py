"""Spreading the pipeline's jobs over the processes of `torchrun --nproc_per_node=N attrspace run`.

The pipeline is many small independent jobs (one LoRA per dataset, one fine-tuning run per method,
arm and seed), each its own cache unit with a marker. So the ranks split the JOBS, not the batches:
job i runs on rank i % N, exactly as a single process would run it (same seeds, same data order), and
no gradient is exchanged. A job's result is then the single-process result up to the thread count's
effect on float sums, and a run may be resumed with any number of ranks. Stages that are one job
(render, pretrain, mine, report) run on rank 0 while the others wait; afterwards every rank reads the
same cached results.

A stage that spreads its jobs calls `skip(i)` before job i and `claim(folder)` before running a job
that is not cached; the driver runs it twice:

    with spreading():   # pass 1: each rank runs its own share
        stage(...)
    barrier()
    stage(...)          # pass 2: every job is cached now; a missing one is another rank's failure

Processes talk through the gloo backend (CPU, any device) and the shared run folder only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch.distributed as dist

# Jobs can take hours; the default 30-minute collective timeout would kill a healthy run.
_TIMEOUT = datetime.timedelta(hours=48)
_state = {"spreading": False, "verifying": False}


class RankJobError(RuntimeError):
    """A job that another rank should have finished is not in the cache."""


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_leader() -> bool:
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group():
    """Join the torchrun job (gloo) for the duration, when launched by torchrun; else do nothing."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    dist.init_process_group("gloo", timeout=_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast_error(error: BaseException | None) -> None:
    """Make every rank raise when any rank failed, so no rank waits forever at the next barrier."""
    size = world()[1]
    if size == 1:
        if error is not None:
            raise error
        return
    messages = [None] * size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise RankJobError(f"rank {r} failed: {m}")


@contextlib.contextmanager
def spreading():
    """Pass 1 of a spread stage: `skip` is true for other ranks' jobs."""
    _state["spreading"] = True
    try:
        yield
    finally:
        _state["spreading"] = False


@contextlib.contextmanager
def verifying():
    """Pass 2 of a spread stage: every job must be cached; `claim` raises otherwise."""
    _state["verifying"] = world()[1] > 1
    try:
        yield
    finally:
        _state["verifying"] = False


def skip(index: int) -> bool:
    rank, size = world()
    return _state["spreading"] and index % size != rank


def claim(folder: Path) -> None:
    """Called before running a job that is not cached: in pass 2 that job belonged to a rank that
    did not finish it, and running it here would race with nobody's lock."""
    if _state["verifying"]:
        raise RankJobError(
            f"{folder} is not done although its rank has finished its share; rerun the command "
            "(finished jobs are cached)"
        )


def run_spread(stage, *args):
    """Run a spread stage on every rank: each rank's share, a barrier, then every rank reads all.

    When the first argument is the run's Workspace, its log ends with each job once: "ran" for the
    jobs any rank ran in this invocation, "cached" for the others (pass 2 finds every job cached;
    the jobs the ranks ran are gathered first so that it records them as run)."""
    if world()[1] == 1:
        return stage(*args)
    ws = args[0] if args and isinstance(getattr(args[0], "events", None), list) else None
    mark = len(ws.events) if ws is not None else 0
    error = None
    try:
        with spreading():
            stage(*args)
    except Exception as exc:  # every rank must reach the collective below
        error = exc
    broadcast_error(error)
    if ws is not None:
        ws.ran_elsewhere |= _all_ran(ws.events[mark:])
        del ws.events[mark:]  # pass 2 records every job once
    with verifying():
        return stage(*args)


def _all_ran(events: list[tuple[str, str]]) -> set[str]:
    """The keys every rank logged as run in its share (collective)."""
    mine = sorted(key for key, status in events if status == "ran")
    gathered: list = [None] * world()[1]
    dist.all_gather_object(gathered, mine)
    return {key for keys in gathered for key in keys}


def run_on_leader(stage, *args):
    """Run a one-job stage on rank 0 first; the other ranks then read its cached result."""
    if world()[1] == 1:
        return stage(*args)
    error, result = None, None
    if is_leader():
        try:
            result = stage(*args)
        except Exception as exc:
            error = exc
    broadcast_error(error)
    if is_leader():
        return result
    with verifying():
        return stage(*args)
