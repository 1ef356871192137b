"""Stage "pretrain": the base model pre-trained from scratch on the mixed family (OUT/base/), or
the given checkpoint taken as the base."""

from __future__ import annotations

import time

from attrspace.data import MIXED
from attrspace.models.vggt.config import CONFIG_FILE
from attrspace.pipeline.cache import (
    clear_marker,
    digest,
    is_done,
    stage_output,
    write_json_atomic,
    write_marker,
)
from attrspace.pipeline.stages.common import curve, data_digest, train_job
from attrspace.pipeline.stages.evaluate import error_terms
from attrspace.pipeline.weights import save_weights
from attrspace.pipeline.workspace import Workspace


def base_digest(ws: Workspace) -> str:
    if ws.preset.needs_checkpoint:
        return digest("base-checkpoint", ws.checkpoint_identity(), ws.preset.model)
    return digest(
        "base", ws.preset.model, data_digest(ws, MIXED), ws.preset.pretrain, ws.preset.seed
    )


def pretrain_stage(ws: Workspace) -> str:
    """Pre-train the model from scratch on the mixed family (OUT/base/), or take the checkpoint.
    Returns the base digest."""
    folder = ws.out / "base"
    expected = base_digest(ws)
    if is_done(folder, expected):
        ws.record("base", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    if ws.preset.needs_checkpoint:
        ws.load_base()  # validates every key and shape of the checkpoint once
        write_marker(
            folder, "base", expected, time.perf_counter() - start, checkpoint=str(ws.checkpoint)
        )
        ws.record("base", "ran")
        return expected
    scenes = ws.scenes(MIXED)
    model = ws.new_model()
    log = train_job(ws, model, scenes, ws.preset.pretrain, "pretrain")
    errors = error_terms(model, scenes[:16], ws.device)
    with stage_output(folder) as tmp:
        save_weights(model, tmp / "model.safetensors", expected)
        ws.preset.model.save(tmp / CONFIG_FILE)  # load_pretrained(OUT/base) rebuilds the model
        write_json_atomic(tmp / "curve.json", {**curve(log), "train_error": errors})
        write_marker(
            tmp,
            "base",
            expected,
            time.perf_counter() - start,
            steps=ws.preset.pretrain.steps,
            scenes=len(scenes),
            train_error=errors["error"],
        )
    ws.record("base", "ran")
    return expected
