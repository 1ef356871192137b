"""torch.multiprocessing entry of tests/pipeline/test_spread_counts.py: a spread stage of 4 jobs on
2 ranks logging into a real Workspace; rank 0 writes its log."""

import json
from pathlib import Path

from attrspace.pipeline import get_preset, spread
from attrspace.pipeline.workspace import Workspace


def jobs_stage(ws: Workspace, folder: Path) -> None:
    for i in range(4):
        if spread.skip(i):
            continue
        path = folder / f"job{i}"
        if path.exists():
            ws.record(f"job{i}", "cached")
            continue
        spread.claim(path)
        path.write_text(str(spread.world()[0]))
        ws.record(f"job{i}", "ran")


def counts_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        ws = Workspace(Path(folder) / "run", get_preset("micro"), progress=False)
        spread.run_spread(jobs_stage, ws, Path(folder))
        if rank == 0:
            (Path(folder) / "events.json").write_text(json.dumps(ws.events))
    finally:
        dist.destroy_process_group()
