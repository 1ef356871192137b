"""Where a VGGT training step keeps its memory: saved-activation bytes per method, frame count and
checkpointing setting, split by region (DINO patch encoder, aggregator blocks, camera / depth /
point heads, the rest), counted exactly on the meta device (`attrspace.measure.memory_meta` says what is
counted: autograd's saved tensors, the inputs checkpointed calls keep, attention counted as the
flash kernel saves it). Nothing is allocated: VGGT-1B at 24 frames x 518 px is counted on a CPU
in seconds.

Setting (that of bench/vggt_memory.py): the aggregator in `dtype` (bf16 by default), the heads in
fp32 (the official forward runs them with autocast off), batch 1, a training step of camera +
depth (+ point) outputs. Methods adapt the 192 linears of the aggregator blocks (qkv, proj, fc1,
fc2 of every frame and global block):
- "frozen": no adapter; the gradient flows from the loss down to the DINO output, what any
  adapter of the blocks needs at least (the memory a frozen model costs once anything in the
  aggregator trains);
- "subspace:K": SubspaceLinear with a random orthonormal bank of K columns per layer;
- "lora:r": LoRA of rank r.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attrspace.adapters.inject import inject, inject_lora
from attrspace.bank import linear_shapes, random_bank
from attrspace.measure.memory_meta import flash_attention_accounting
from attrspace.measure.profiling import storage_key
from attrspace.models.vggt import VGGT, VGGTConfig, aggregator, camera_head, dpt_head
from attrspace.models.vggt.params import block_linear_names
from attrspace.pipeline.presets import PRESETS, get_preset

GIB = 2**30
REGIONS = ("DINO", "blocks", "camera head", "depth head", "point head", "other")
DEFAULT_METHODS = ("frozen", "subspace:16", "lora:16")
# The modules whose `checkpoint` calls keep inputs (they import torch's checkpoint by that name).
_CHECKPOINTING = (aggregator, camera_head, dpt_head)


@dataclass(frozen=True)
class ProfileRow:
    """Bytes one training step keeps for backward. regions: bytes per REGIONS entry (autograd's
    saved tensors where they were saved, checkpoint inputs in the region of the checkpointed
    module); saved + checkpoint = total = sum of regions."""

    model: str
    method: str
    frames: int
    height: int
    width: int
    checkpointing: bool
    saved: int
    checkpoint: int
    regions: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.saved + self.checkpoint


def parse_method(method: str) -> tuple[str, int]:
    """ "frozen" | "subspace:K" | "lora:r" -> (kind, K or r; 0 for frozen)."""
    kind, _, value = method.partition(":")
    if kind == "frozen" and not value:
        return kind, 0
    if kind in ("subspace", "lora") and value.isdigit() and int(value) > 0:
        return kind, int(value)
    raise ValueError(
        f"method must be 'frozen', 'subspace:K' or 'lora:r' (K, r >= 1), got {method!r}"
    )


def method_label(method: str) -> str:
    kind, rank = parse_method(method)
    return {"frozen": "frozen", "subspace": f"SubspaceLinear K={rank}", "lora": f"LoRA r={rank}"}[
        kind
    ]


def build_model(
    config: VGGTConfig, method: str, checkpointing: bool, dtype: torch.dtype = torch.bfloat16
) -> VGGT:
    """VGGT on the meta device, the aggregator in `dtype`, `method`'s adapters on the block
    linears, gradient checkpointing of the aggregator and the heads set to `checkpointing`."""
    kind, rank = parse_method(method)
    with torch.device("meta"):
        model = VGGT(config)
    model.set_gradient_checkpointing(checkpointing)
    model.aggregator.to(dtype)
    model.requires_grad_(False)
    targets = tuple(block_linear_names(model))
    if kind == "subspace":
        bank = random_bank(linear_shapes(model, targets), rank, scale=2.0, dtype=dtype)
        inject(model, bank)
    elif kind == "lora":
        inject_lora(model, targets, rank=rank, alpha=2 * rank)
    return model.train()


def _region_of(model: VGGT) -> dict[int, str]:
    """id(module) -> region, for the modules that open a region."""
    regions = {id(model.aggregator.patch_embed): "DINO"}
    for blocks in (model.aggregator.frame_blocks, model.aggregator.global_blocks):
        regions.update({id(b): "blocks" for b in blocks})
    for name, region in (("camera_head", "camera head"), ("depth_head", "depth head")):
        if getattr(model, name) is not None:
            regions[id(getattr(model, name))] = region
    if model.point_head is not None:
        regions[id(model.point_head)] = "point head"
    return regions


def _pop(stack: list[str]) -> None:
    stack.pop()  # a forward hook that returned the popped name would replace the module output


@contextlib.contextmanager
def _tracking_regions(model: VGGT, stack: list[str]) -> Iterator[dict[int, str]]:
    """Hooks that keep `stack[-1]` the region whose module is running."""
    regions = _region_of(model)
    handles = []
    for module in model.modules():
        if id(module) in regions:
            name = regions[id(module)]
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
            handles.append(module.register_forward_hook(lambda m, a, o: _pop(stack)))
    try:
        yield regions
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _counting_checkpoints(regions: dict[int, str], seen: set, kept: dict[str, int]):
    """Count the tensor inputs of every `checkpoint` call of the model's modules in the region
    of the module (or bound method's module) that is checkpointed."""
    originals = {m: m.checkpoint for m in _CHECKPOINTING}

    def wrap(original):
        def counted(fn, *args, **kwargs):
            owner = getattr(fn, "__self__", fn)
            region = regions.get(id(owner), "other")
            for a in args:
                if isinstance(a, Tensor) and storage_key(a) not in seen:
                    seen.add(storage_key(a))
                    kept[region] = kept.get(region, 0) + a.untyped_storage().nbytes()
            return original(fn, *args, **kwargs)

        return counted

    for m, original in originals.items():
        m.checkpoint = wrap(original)
    try:
        yield
    finally:
        for m, original in originals.items():
            m.checkpoint = original


def step_bytes_by_region(model: VGGT, images: Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """One training step of `model` on `images` -> (autograd's saved bytes per region, checkpoint
    input bytes per region). Parameters and buffers are not activations and are left out. A model
    without trainable parameters gets the gradient flowing from the DINO output on (see the
    module docstring: "frozen")."""
    seen = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[str, int] = {}
    kept: dict[str, int] = {}
    stack: list[str] = []

    def pack(t: Tensor):
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            region = stack[-1] if stack else "other"
            saved[region] = saved.get(region, 0) + t.untyped_storage().nbytes()
        return t

    handle = None
    if not any(p.requires_grad for p in model.parameters()):
        handle = model.aggregator.patch_embed.register_forward_hook(
            lambda m, i, out: out.detach().requires_grad_()
        )
    try:
        with contextlib.ExitStack() as es:
            es.enter_context(flash_attention_accounting())
            regions = es.enter_context(_tracking_regions(model, stack))
            es.enter_context(_counting_checkpoints(regions, seen, kept))
            es.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            out = model(images)
            keys = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
            loss = sum(out[k].sum() for k in keys if k in out)
            del out, loss
    finally:
        if handle is not None:
            handle.remove()
    return saved, kept


def _resolve(model: VGGTConfig | str) -> tuple[str, VGGTConfig]:
    """A VGGTConfig, a preset name or a config.json path -> (label, config)."""
    if isinstance(model, VGGTConfig):
        return "VGGT config", model
    if model in PRESETS:
        return f"preset {model}", get_preset(model).model
    if Path(model).exists():
        return str(model), VGGTConfig.load(model)
    raise ValueError(
        f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path"
    )


def check_profile_args(
    model: VGGTConfig | str,
    methods: Sequence[str],
    frames: Sequence[int],
    size: int | tuple[int, int] | None,
) -> tuple[str, VGGTConfig, tuple[int, int]]:
    """Check profile_activations' arguments -> (model label, config, (H, W)); ValueError naming
    the bad one."""
    label, config = _resolve(model)
    if not methods:
        raise ValueError("methods: give at least one")
    for m in methods:
        parse_method(m)
    if not frames or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in frames):
        raise ValueError(f"frames must be positive ints, got {list(frames)}")
    h, w = (size, size) if isinstance(size, int) else (size or (config.img_size,) * 2)
    if h < 1 or w < 1 or h % config.patch_size or w % config.patch_size:
        raise ValueError(f"size {h}x{w} must be positive multiples of {config.patch_size}")
    return label, config, (h, w)


def profile_activations(
    model: VGGTConfig | str = "vggt1b",
    methods: Sequence[str] = DEFAULT_METHODS,
    frames: Sequence[int] = (8, 24),
    checkpointing: Sequence[bool] = (False, True),
    size: int | tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[int, int, ProfileRow, float], None] | None = None,
) -> list[ProfileRow]:
    """Saved-activation bytes of one training step for every method x frames x checkpointing.

    model: a VGGTConfig, a preset name ("vggt1b", "tiny", ...) or a config.json path; size:
    (H, W) or one side of square images (default: the config's img_size, 518 for VGGT-1B);
    dtype: the aggregator's (heads stay fp32); progress(i, n, row, seconds) after each row.
    Every argument is checked before the first row is counted."""
    label, config, (h, w) = check_profile_args(model, methods, frames, size)
    plan = [(f, c, m) for f in frames for c in checkpointing for m in methods]
    rows = []
    for i, (f, ckpt, method) in enumerate(plan):
        start = time.perf_counter()
        net = build_model(config, method, bool(ckpt), dtype)
        images = torch.empty(1, f, 3, h, w, device="meta", dtype=dtype)
        saved, kept = step_bytes_by_region(net, images)
        regions = {r: saved.get(r, 0) + kept.get(r, 0) for r in REGIONS}
        row = ProfileRow(
            label, method, f, h, w, bool(ckpt), sum(saved.values()), sum(kept.values()), regions
        )
        rows.append(row)
        if progress is not None:
            progress(i, len(plan), row, time.perf_counter() - start)
    return rows


def format_table(rows: Sequence[ProfileRow]) -> str:
    """A markdown table: one line per row, GiB in total and per region (DINO, blocks, camera and
    depth head always; point head and other where some row holds bytes there), and the ratio to
    the frozen model of the same setting."""
    always = ("DINO", "blocks", "camera head", "depth head")
    used = [r for r in REGIONS if r in always or any(row.regions.get(r, 0) for row in rows)]
    frozen = {(r.frames, r.checkpointing): r.total for r in rows if r.method == "frozen"}
    head = ["method", "frames", "checkpointing", "total GiB", *[f"{r} GiB" for r in used]]
    head += ["/ frozen"] if frozen else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            method_label(row.method),
            str(row.frames),
            "on" if row.checkpointing else "off",
            f"{row.total / GIB:.2f}",
            *[f"{row.regions.get(r, 0) / GIB:.2f}" for r in used],
        ]
        if frozen:
            base = frozen.get((row.frames, row.checkpointing))
            cells.append(f"{row.total / base:.2f}" if base else "")
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0] if rows else None
    title = (
        f"{first.model}: saved activations of one training step, batch 1, "
        f"{first.height}x{first.width} px (meta device, exact)\n\n"
        if first
        else ""
    )
    return title + "\n".join(lines)


def plot_rows(rows: Sequence[ProfileRow], path: str | Path) -> Path:
    """A stacked bar chart (GiB per region) of the rows as a PNG at `path` (needs matplotlib,
    the `[plot]` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the PNG needs matplotlib: pip install 'attrspace[plot]'") from err
    used = [r for r in REGIONS if any(row.regions.get(r, 0) for row in rows)]
    labels = [
        f"{method_label(r.method)}\n{r.frames} fr, ckpt {'on' if r.checkpointing else 'off'}"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for region in used:
        values = [r.regions.get(region, 0) / GIB for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=region)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("saved activations per step (GiB)")
    if rows:
        ax.set_title(f"{rows[0].model}, {rows[0].height}x{rows[0].width} px, batch 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
