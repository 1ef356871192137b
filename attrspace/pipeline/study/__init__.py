"""The controlled study of the paper's claims (docs/study/protocol.md): LoRA sets and control
banks (banks.py), statistics on the LoRAs (evidence.py, stats.py), learning rates chosen on
validation scenes (lr.py), fine-tuning arms (arms.py), the paper's metrics (endpoints.py), the
decision rule (verdict.py) and the report section (report.py)."""

from attrspace.pipeline.study.stage import study_stage

__all__ = ["study_stage"]
