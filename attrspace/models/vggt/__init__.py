"""A VGGT-compatible model: the official module names and state-dict layout (so `model.pt` /
`model.safetensors` of VGGT-1B load into it), tiny configurations for CPU work, pose helpers and the
parameter accounting of the paper's fine-tuning presets. The official track head is not built.

    from attrspace.models.vggt import VGGT, VGGTConfig, load_checkpoint

    with torch.device("meta"):
        model = VGGT(VGGTConfig.vggt_1b(enable_point=False))
    print(load_checkpoint(model, "model.safetensors"))  # skips track / point head keys, says so
"""

from .checkpoint import LoadReport, load_checkpoint
from .config import VGGTConfig
from .model import VGGT
from .params import (
    PRESETS,
    AdaptationTargets,
    adaptation_targets,
    paper_parameter_table,
    trainable_parameter_count,
)
from .pose import (
    extrinsics_to_pose_encoding,
    normalize_scene,
    pose_encoding_to_extrinsics,
    predictions_to_world_points,
)

__all__ = [
    "PRESETS",
    "VGGT",
    "AdaptationTargets",
    "LoadReport",
    "VGGTConfig",
    "adaptation_targets",
    "extrinsics_to_pose_encoding",
    "load_checkpoint",
    "normalize_scene",
    "paper_parameter_table",
    "pose_encoding_to_extrinsics",
    "predictions_to_world_points",
    "trainable_parameter_count",
]
