"""The end-to-end mining pipeline: render -> pre-train -> attribute LoRAs -> mine -> fine-tune ->
report, each stage cached in a run folder so that a rerun skips finished work and an interrupted run
resumes. `attrspace run --preset tiny --out DIR` is the command-line form.

    from attrspace.pipeline import get_preset, run_pipeline

    ws = run_pipeline(get_preset("tiny"), "runs/tiny")   # writes runs/tiny/report.md
"""

from attrspace.pipeline.cache import StageFileError
from attrspace.pipeline.presets import METHODS, PRESETS, DataSizes, Preset, get_preset
from attrspace.pipeline.report.document import write_report
from attrspace.pipeline.run import STAGES, run_pipeline, run_stages
from attrspace.pipeline.workspace import Workspace

__all__ = [
    "METHODS",
    "PRESETS",
    "STAGES",
    "DataSizes",
    "Preset",
    "StageFileError",
    "Workspace",
    "get_preset",
    "run_pipeline",
    "run_stages",
    "write_report",
]
