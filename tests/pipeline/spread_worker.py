"""Runs the reduced study preset into OUT: `python tests/pipeline/spread_worker.py OUT`, or under
`torchrun --nproc_per_node=2 tests/pipeline/spread_worker.py OUT` (tests/pipeline/test_spread.py)."""

import json
import sys
from pathlib import Path

from attrspace.pipeline import run_pipeline, spread
from attrspace.pipeline.presets import reduced_study

if __name__ == "__main__":
    run_pipeline(reduced_study(), sys.argv[1], progress=False)


def jobs_stage(folder: Path, fail_on: int | None, idle_on: int | None) -> list[int]:
    """A spread stage of 4 jobs, each a file in `folder`; the rank `fail_on` raises in its share,
    the rank `idle_on` does none of its share (as if it had died without a word)."""
    rank = spread.world()[0]
    done = []
    for i in range(4):
        if spread.skip(i):
            continue
        path = folder / f"job{i}"
        if path.exists():
            done.append(i)
            continue
        spread.claim(path)
        if rank == fail_on:
            raise RuntimeError(f"job {i} broke")
        if rank == idle_on:
            continue
        path.write_text(str(rank))
        done.append(i)
    return done


def spread_worker(rank: int, world: int, folder: str, fail_on, idle_on) -> None:
    """torch.multiprocessing entry: run `jobs_stage` spread over the ranks and write what happened."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        result = {"done": spread.run_spread(jobs_stage, Path(folder), fail_on, idle_on)}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
