"""Which layers each fine-tuning method of the paper adapts, and how many parameters it trains.

Everything is computed from module shapes, so it works on a model built on the meta device (no
weights allocated): `VGGT(VGGTConfig.vggt_1b())` under `torch.device("meta")` reproduces the
paper's table (see `paper_parameter_table`).

Presets (paper section "parameter counts"; the DINO encoder is frozen in every method):
- "paper-full": every parameter of the 24 frame + 24 global blocks, the aggregator's camera and
  register tokens, the camera head and the depth head.
- "paper-lora": LoRA of rank r on every nn.Linear of the 48 blocks and of the camera head and on
  every nn.Conv2d of the depth head (not its two ConvTranspose2d).
- "paper-subspace": the frozen-basis form (a trainable K x K matrix) on the 192 block Linears
  (qkv, proj, fc1, fc2), LoRA of rank r on the same head layers as "paper-lora".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

PRESETS = ("paper-full", "paper-lora", "paper-subspace")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_FULL_PREFIXES = (
    "aggregator.frame_blocks.",
    "aggregator.global_blocks.",
    "aggregator.camera_token",
    "aggregator.register_token",
    "camera_head.",
    "depth_head.",
)


@dataclass(frozen=True)
class AdaptationTargets:
    """Qualified names a preset adapts.

    full: parameters trained directly; lora: nn.Linear / nn.Conv2d modules that get a LoRA;
    subspace: nn.Linear modules that get the frozen-basis adapter (one K x K matrix each).
    """

    preset: str
    full: tuple[str, ...] = ()
    lora: tuple[str, ...] = ()
    subspace: tuple[str, ...] = ()


def block_linear_names(model: nn.Module) -> list[str]:
    """The Linears of the frame and global blocks (4 per block: 192 in VGGT-1B), in block order."""
    names = []
    for kind in ("frame_blocks", "global_blocks"):
        blocks = model.get_submodule(f"aggregator.{kind}")
        for i in range(len(blocks)):
            names += [f"aggregator.{kind}.{i}.{layer}" for layer in BLOCK_LINEARS]
    return names


def head_lora_names(model: nn.Module) -> list[str]:
    """Every nn.Linear of the camera head and every nn.Conv2d of the depth head (exact types, so
    the depth head's ConvTranspose2d layers are left out)."""
    names = []
    for head, kind in (("camera_head", nn.Linear), ("depth_head", nn.Conv2d)):
        module = getattr(model, head, None)
        if module is None:
            raise ValueError(f"the model has no {head}; the paper's presets need it")
        names += [f"{head}.{n}" for n, m in module.named_modules() if type(m) is kind]
    return names


def adaptation_targets(model: nn.Module, preset: str) -> AdaptationTargets:
    """The names `preset` adapts in `model` (a VGGT of any size, meta device is fine)."""
    if preset == "paper-full":
        for head in ("camera_head", "depth_head"):
            if getattr(model, head, None) is None:
                raise ValueError(f"the model has no {head}; the paper's presets need it")
        full = tuple(n for n, _ in model.named_parameters() if n.startswith(_FULL_PREFIXES))
        return AdaptationTargets(preset, full=full)
    if preset == "paper-lora":
        lora = tuple(block_linear_names(model) + head_lora_names(model))
        return AdaptationTargets(preset, lora=lora)
    if preset == "paper-subspace":
        return AdaptationTargets(
            preset, lora=tuple(head_lora_names(model)), subspace=tuple(block_linear_names(model))
        )
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def lora_parameter_count(module: nn.Module, rank: int) -> int:
    """Parameters of a rank-r LoRA (peft's layout) of one layer.

    nn.Linear: A (r, in) + B (out, r). nn.Conv2d: A = Conv2d(in, r, same kernel) -> r * in/groups *
    kh * kw, B = Conv2d(r, out, 1) -> out * r.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if type(module) is nn.Linear:
        return rank * (module.in_features + module.out_features)
    if type(module) is nn.Conv2d:
        kh, kw = module.kernel_size
        return rank * (module.in_channels // module.groups) * kh * kw + module.out_channels * rank
    raise TypeError(f"LoRA is defined for nn.Linear and nn.Conv2d, not {type(module).__name__}")


def trainable_parameter_count(
    model: nn.Module, preset: str, *, rank: int = 16, subspace_dim: int | Mapping[str, int] = 16
) -> int:
    """Trainable parameters of `preset`: rank applies to LoRA layers, subspace_dim (one K for all,
    or K per layer name) to the frozen-basis layers (K^2 each)."""
    targets = adaptation_targets(model, preset)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in targets.full)
    total += sum(lora_parameter_count(model.get_submodule(n), rank) for n in targets.lora)
    for name in targets.subspace:
        k = subspace_dim[name] if isinstance(subspace_dim, Mapping) else subspace_dim
        if k <= 0:
            raise ValueError(f"subspace dim of {name} must be positive, got {k}")
        total += k * k
    return total


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_out * c_in * k * k + (c_out if bias else 0)


def dpt_head_parameter_count(
    dim_in: int, out_channels, features: int, output_dim: int | None
) -> int:
    """Parameters of a DPT head; output_dim None is the official feature-only variant (the track
    head's feature extractor: output_conv1 keeps `features` channels, no output_conv2)."""
    oc = list(out_channels)
    n = 2 * dim_in  # norm
    n += sum(_conv(dim_in, c, 1) for c in oc)  # projects
    n += _conv(oc[0], oc[0], 4) + _conv(oc[1], oc[1], 2) + _conv(oc[3], oc[3], 3)  # resize
    n += sum(_conv(c, features, 3, bias=False) for c in oc)  # layer*_rn
    unit = 2 * _conv(features, features, 3)
    n += 3 * (2 * unit + _conv(features, features, 1)) + unit + _conv(features, features, 1)
    if output_dim is None:
        return n + _conv(features, features, 3)
    half = features // 2
    return n + _conv(features, half, 3) + _conv(half, 32, 3) + _conv(32, output_dim, 1)


def official_track_head_parameter_count(embed_dim: int = 1024, out_channels=None) -> int:
    """Parameters of the official track head (not built by this package), from its sizes: a
    feature-only DPT (features 128) and a tracker with latent 128, hidden 384, 7 correlation levels
    of radius 4, 6 time + 6 virtual-space self-attention blocks, 6 + 6 cross-attention blocks
    (MLP x4) and 64 virtual tracks."""
    out_channels = (256, 512, 1024, 1024) if out_channels is None else out_channels
    latent, hidden, levels, radius, depth, virtual = 128, 384, 7, 4, 6, 64
    corr = levels * (2 * radius + 1) ** 2
    width_in = 3 * latent + 4  # transformer input: flow embedding, correlations, features
    width_out = 2 + latent
    self_block = (
        2 * 2 * hidden + (4 * hidden * hidden + 4 * hidden) + (8 * hidden * hidden + 5 * hidden)
    )
    cross_block = self_block + 2 * hidden  # plus the context norm
    tracker = (corr * hidden + hidden) + (hidden * latent + latent)  # corr_mlp
    tracker += 2 * width_in  # query_ref_token
    tracker += (
        2 * width_in + (width_in * hidden + hidden) + 2 * hidden
    )  # input norm/transform, out norm
    tracker += hidden * width_out + width_out + virtual * hidden  # flow_head, virtual tracks
    tracker += 2 * depth * self_block + 2 * depth * cross_block
    tracker += (
        2 * 2 * latent + (latent * latent + latent) + 2 * (latent + 1)
    )  # norms, updater, vis, conf
    features = dpt_head_parameter_count(2 * embed_dim, out_channels, 128, None)
    return features + tracker


def paper_parameter_table(model: nn.Module | None = None) -> dict[str, int]:
    """The paper's parameter table, counted from `model` (default: VGGT-1B on the meta device).

    Keys: "total" (the official model, track head included), "total_built" (this package's model,
    which has no track head), "paper-full", "paper-lora r=16/64/256", "paper-subspace K=16 r=16".
    """
    if model is None:
        from attrspace.models.vggt.config import VGGTConfig
        from attrspace.models.vggt.model import VGGT

        with torch.device("meta"):
            model = VGGT(VGGTConfig.vggt_1b())
    built = sum(p.numel() for p in model.parameters())
    config = model.config
    table = {
        "total": built
        + official_track_head_parameter_count(config.embed_dim, config.dpt_out_channels),
        "total_built": built,
        "paper-full": trainable_parameter_count(model, "paper-full"),
    }
    for r in (16, 64, 256):
        table[f"paper-lora r={r}"] = trainable_parameter_count(model, "paper-lora", rank=r)
    table["paper-subspace K=16 r=16"] = trainable_parameter_count(
        model, "paper-subspace", rank=16, subspace_dim=16
    )
    return table
