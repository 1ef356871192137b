"""Render throughput of the synthetic-data ray caster on the CPU.

Run: python -m pytest bench/bench_render.py --benchmark-only
One round renders 4 scenes of the mixed family (4 views each, so 16 views) at 56, 112 and 224 px,
with 1 (render_scene's default) and with 2 intra-op threads; extra_info holds views per second from
the median round. Two threads pay off only when nothing else runs on the cores.
test_tiny_run_data renders what the tiny end-to-end preset needs (4 attributes x 3 datasets x
4 scenes x 4 views plus a mixed family of 16 scenes, 56 px) once.
"""

from __future__ import annotations

import os

import pytest
import torch

from attrspace.data.families import family_specs, make_family
from attrspace.data.render import render_scene

SCENES, VIEWS = 4, 4
ROUNDS = int(os.environ.get("ATTRSPACE_BENCH_ROUNDS", 5))


def _machine() -> str:
    return (
        f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", [56, 112, 224])
def test_render_views_per_second(benchmark, size, threads):
    scenes = family_specs("mixed", 1, SCENES, VIEWS, seed=0)[0].scenes

    def step():
        for spec in scenes:
            render_scene(spec, size, threads=threads)

    benchmark.group = f"render {size} px"
    benchmark.extra_info.update(
        {"machine": _machine(), "size": size, "threads": threads, "views": SCENES * VIEWS}
    )
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["views_per_s"] = SCENES * VIEWS / benchmark.stats.stats.median


def test_tiny_run_data(benchmark):
    def step():
        for attribute in ("texture", "geometry", "camera", "lighting"):
            make_family(attribute, 3, 4, VIEWS, 56, seed=0)
        make_family("mixed", 1, 16, VIEWS, 56, seed=0)

    benchmark.group = "tiny run data"
    benchmark.extra_info.update({"machine": _machine(), "views": (4 * 3 * 4 + 16) * VIEWS})
    benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
