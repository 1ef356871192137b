"""Runs the reduced study preset into OUT: `python tests/pipeline_ranks_worker.py OUT`, or under
`torchrun --nproc_per_node=2 tests/pipeline_ranks_worker.py OUT` (tests/test_pipeline_ranks.py)."""

import sys

from attrspace.pipeline import run_pipeline
from attrspace.pipeline.presets import reduced_study

if __name__ == "__main__":
    run_pipeline(reduced_study(), sys.argv[1], progress=False)
