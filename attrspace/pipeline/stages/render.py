"""Stage "render": every family of the run's plan into OUT/data/<family>/."""

from __future__ import annotations

import time

from attrspace.data import write_family
from attrspace.pipeline.cache import clear_marker, is_done, stage_output, write_marker
from attrspace.pipeline.stages.common import content_streams, data_digest, family_plan
from attrspace.pipeline.workspace import Workspace


def render_stage(ws: Workspace) -> dict[str, str]:
    """Render every family of the plan into OUT/data/<family>/; returns family -> digest."""
    out = {}
    data = ws.preset.data
    for family, (n, scenes) in family_plan(ws).items():
        folder = ws.family_dir(family)
        expected = data_digest(ws, family)
        out[family] = expected
        if is_done(folder, expected):
            ws.record(f"data/{family}", "cached")
            continue
        clear_marker(folder)
        start = time.perf_counter()
        with ws.bar(n * scenes, f"render {family}") as bar, stage_output(folder) as tmp:
            write_family(
                tmp,
                family,
                n,
                scenes,
                data.views,
                data.image_size,
                ws.preset.seed,
                on_scene=lambda: bar.update(1),
                threads=ws.preset.threads or None,
                content_streams=content_streams(ws, family),
            )
            seconds = time.perf_counter() - start
            write_marker(tmp, "data", expected, seconds, family=family, scenes=n * scenes)
        ws.record(f"data/{family}", "ran")
    return out
