"""`attrspace finetune --data DIR --bank FILE --out OUT`: fine-tune on your own multi-view scenes.

The inputs are checked before any training step (`check_inputs`): the scenes (scene folders of
`attrspace.data.folder`, or a family rendered by `attrspace render`), the bank (ours, the official
release's layout, or a run folder's OUT/mine/bank.safetensors) against the model's layers, the
base (a model folder with config.json, a weights file of the preset's architecture, or the
preset's model freshly initialised for a smoke test) and the config. Then, in OUT:

    config.toml         the resolved config (read back and validated)
    inputs.json         what the run read: data identity, bank sha256, base, split, digest
    state.safetensors   the resumable state (attrspace.train.resumable), saved every
                        train.save_every steps; rerunning the command continues from it
    adapter/            the trained adapter as a plain peft folder (attrspace.export_peft)
    heads.safetensors   the trained head parameters (adapter.heads = "full" only)
    metrics.json        objective per step, validation objective at the configured cadence
    .stage.json         the marker of a finished run (attrspace.pipeline.cache)

The digest of the config, the data, the bank and the base names the run: a finished run with the
same digest is not redone, and a state of another digest is refused rather than continued.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attrspace.adapters.inject import inject, inject_lora
from attrspace.bank import BankFileError, SubspaceBank
from attrspace.bank.subspace_bank import LayerSubspace
from attrspace.data.folder import (
    CAMERAS,
    SceneFolderDataset,
    find_scenes,
    hash_seed,
    read_cameras,
)
from attrspace.data.storage import MANIFEST, MultiViewDataset, make_sample
from attrspace.export.writers import export_peft
from attrspace.models.vggt.checkpoint import load_checkpoint
from attrspace.models.vggt.config import CONFIG_FILE, VGGTConfig
from attrspace.models.vggt.model import VGGT
from attrspace.models.vggt.params import adaptation_targets
from attrspace.pipeline.cache import (
    MARKER,
    digest,
    file_sha256,
    is_done,
    read_json,
    write_json_atomic,
    write_marker,
)
from attrspace.pipeline.presets import Preset, get_preset
from attrspace.pipeline.stages.mining import BANK_FILE
from attrspace.pipeline.workspace import RunInputError, torch_threads
from attrspace.train.config import FinetuneConfig, load_config, save_config
from attrspace.train.resumable import check_state, read_state_tensors, run_training
from attrspace.util.files import atomic_save_safetensors
from attrspace.util.folders import folder_lock

STATE_FILE = "state.safetensors"
ADAPTER_DIR = "adapter"
HEAD_MODULES = ("camera_head.", "depth_head.", "point_head.")


@dataclass
class Inputs:
    """What check_inputs found: the per-scene datasets of each split, the bank, the base model
    (on the meta device when weights come from a file) and the identities that go into the run's
    digest."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    split: dict
    bank: SubspaceBank
    bank_file: Path
    model: nn.Module
    weights: Path | None
    identity: dict


# -- the bank -------------------------------------------------------------------------------------


def read_bank(path: Path) -> tuple[SubspaceBank, Path]:
    """A bank file (ours or the official layout) or a run folder holding mine/bank.safetensors."""
    path = Path(path)
    if path.is_dir():
        inner = path / "mine" / BANK_FILE
        if not inner.is_file():
            raise RunInputError(f"--bank {path}: a folder without {inner.relative_to(path)}")
        path = inner
    if not path.is_file():
        raise RunInputError(f"--bank {path}: no such file")
    try:
        return SubspaceBank.load(path), path
    except BankFileError as ours:
        try:
            return SubspaceBank.load_official(path), path
        except BankFileError:
            raise BankFileError(f"{ours} (nor is it in the official release's layout)") from None


def shaped_bank(bank: SubspaceBank, rank_cap: int, scale: float) -> SubspaceBank:
    """The bank with at most rank_cap columns per layer (0: all) and scale (0: its own)."""
    layers = bank.layers
    if rank_cap:
        layers = {
            name: LayerSubspace(
                x.U[:, :rank_cap].contiguous(),
                x.V[:, :rank_cap].contiguous(),
                x.column_attribute[:rank_cap].contiguous(),
                None if x.singular_values is None else x.singular_values[:rank_cap].contiguous(),
            )
            for name, x in bank.layers.items()
        }
    return SubspaceBank(
        layers,
        bank.attributes,
        bank.model_config,
        scale or bank.scale,
        bank.orthonormal,
        bank.extra,
    )


def bank_misfits(model: nn.Module, bank: SubspaceBank) -> list[str]:
    """Every layer of the bank the model lacks or whose shape differs (empty when it fits)."""
    modules = dict(model.named_modules())
    problems = []
    for name, layer in bank.layers.items():
        m = modules.get(name)
        if type(m) is not nn.Linear:
            problems.append(f"{name}: {'missing' if m is None else type(m).__name__}")
        elif (m.out_features, m.in_features) != (layer.d_out, layer.d_in):
            problems.append(
                f"{name}: model {m.in_features}->{m.out_features}, bank {layer.d_in}->{layer.d_out}"
            )
    return problems


# -- the scenes -----------------------------------------------------------------------------------


class _FirstViews(torch.utils.data.Dataset):
    """Samples of a rendered family cut to their first `frames` views (0: all)."""

    def __init__(self, family: MultiViewDataset, indices: list[int], frames: int):
        self.family, self.indices, self.frames = family, indices, frames

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        s = self.family[self.indices[i]]
        if not self.frames:
            return s
        parts = (s[k][: self.frames] for k in ("images", "depths", "extrinsics", "intrinsics"))
        return make_sample(*parts, seq_name=s["seq_name"])


def _folder_identity(scenes: list[Path]) -> str:
    """Digest of every cameras.json and the name and size of every file it names."""
    h = hashlib.sha256()
    for folder in scenes:
        h.update(f"{folder.name}\0{file_sha256(folder / CAMERAS)}\0".encode())
        for view in read_cameras(folder):
            for path in (view["image"], view["depth"]):
                if path is not None:
                    h.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0".encode())
    return h.hexdigest()


def scene_units(root: Path, config: FinetuneConfig) -> tuple[list, list[str], str]:
    """(one dataset per scene, scene names, identity digest) of a data root: scene folders, or a
    rendered family (manifest.json). Every cameras.json is validated here."""
    t = config.train
    if (root / MANIFEST).is_file():
        if t.image_size:
            raise RunInputError(f"--data {root}: train.image_size applies to scene folders only")
        family = MultiViewDataset(root)
        n = len(family)
        units = [_FirstViews(family, [i], t.frames) for i in range(n)]
        return units, [f"scene_{i:05d}" for i in range(n)], file_sha256(root / MANIFEST)
    scenes = find_scenes(root)
    size = t.image_size or None
    units = [
        SceneFolderDataset(s, size, t.frames or None, seed=hash_seed(t.seed, i))
        for i, s in enumerate(scenes)
    ]
    return units, [s.name for s in scenes], _folder_identity(scenes)


def split_scenes(names: list[str], config: FinetuneConfig) -> tuple[list[int], list[int]]:
    """(train, validation) scene indices: a seeded draw of round(fraction x scenes) whole scenes
    (at least one when fraction > 0), disjoint from the training scenes."""
    n, fraction = len(names), config.validation.fraction
    n_val = max(1, round(fraction * n)) if fraction > 0 else 0
    if n - n_val < 1:
        raise RunInputError(
            f"{n} scene(s) leave none to train on with validation.fraction = {fraction}; "
            "add scenes or set validation.fraction = 0"
        )
    g = torch.Generator().manual_seed(hash_seed(config.train.seed, 7))
    order = torch.randperm(n, generator=g).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def _unit_shape(unit) -> tuple[int, int, int] | None:
    """(views, H, W) of a scene folder's samples from its cameras.json and its first image's
    header (no image decoded); a rendered family's from its first scene (one shape for all)."""
    if not isinstance(unit, SceneFolderDataset):
        images = unit.family[0]["images"]
        return unit.frames or images.shape[0], *images.shape[-2:]
    from PIL import Image  # the [data] extra, needed to read scene folders at all

    views = read_cameras(unit.scenes[0])
    if unit.size is not None:
        return unit.frames or len(views), *unit.size
    with Image.open(views[0]["image"]) as im:
        w, h = im.size
    return unit.frames or len(views), h, w


def _check_samples(units: list, names: list[str], config: FinetuneConfig, patch: int) -> None:
    """Every scene's images fit the patch size, and the training samples can share a batch."""
    n = sum(len(u) for u in units)
    if config.train.batch_size > n:
        raise RunInputError(
            f"train.batch_size {config.train.batch_size} exceeds the {n} training samples"
        )
    shapes = {}
    for unit, name in zip(units, names, strict=True):
        shape = _unit_shape(unit)
        if shape[1] % patch or shape[2] % patch:
            raise RunInputError(
                f"scene {name}: images are {shape[1]}x{shape[2]}, not multiples of the patch "
                f"size {patch}: set train.image_size"
            )
        shapes.setdefault(shape, name)
    if config.train.batch_size > 1 and len(shapes) > 1:
        raise RunInputError(
            f"scenes of different shapes (views, H, W) {shapes} cannot share a batch: set "
            "train.image_size and train.frames, or train.batch_size = 1"
        )


# -- the base model -------------------------------------------------------------------------------


def base_model(
    preset: Preset, checkpoint: Path | None, config: FinetuneConfig
) -> tuple[nn.Module, Path | None, dict]:
    """(model, weights to load or None, identity). A model folder brings its config.json; a
    weights file takes the preset's architecture; no checkpoint: the preset's model freshly
    initialised (seeded by the preset's seed), for smoke tests. Weights are loaded later
    (`load_base_weights`), after the bank has been checked against the meta-device model."""
    checkpointing = {"gradient_checkpointing": config.train.gradient_checkpointing}
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.seed)
            model = VGGT(preset.model.replace(**checkpointing))
        return (
            model,
            None,
            {"random": preset.name, "model": preset.model.to_dict(), "seed": preset.seed},
        )
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        model_config = VGGTConfig.load(checkpoint / CONFIG_FILE)
    elif checkpoint.is_file():
        model_config = preset.model
    else:
        raise RunInputError(f"--checkpoint {checkpoint}: no such file or folder")
    with torch.device("meta"):
        model = VGGT(model_config.replace(**checkpointing))
    files = sorted(checkpoint.iterdir()) if checkpoint.is_dir() else [checkpoint]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    identity = {"checkpoint": str(checkpoint.resolve()), "files": stats}
    return model, checkpoint, {**identity, "model": model_config.to_dict()}


def check_inputs(
    data: Path, bank: Path, preset: Preset, checkpoint: Path | None, config: FinetuneConfig
) -> Inputs:
    """Every input of the run, checked before any training work (RunInputError, BankFileError,
    SceneFormatError or ValueError naming the input)."""
    data = Path(data)
    if not data.is_dir():
        raise RunInputError(f"--data {data}: no such folder")
    units, names, data_id = scene_units(data, config)
    train_idx, val_idx = split_scenes(names, config)
    raw_bank, bank_file = read_bank(bank)
    shaped = shaped_bank(raw_bank, config.adapter.rank_cap, config.adapter.scale)
    model, weights, base_id = base_model(preset, checkpoint, config)
    misfits = bank_misfits(model, shaped)
    if misfits:
        raise RunInputError(
            f"--bank {bank_file}: does not fit the model's layers ({len(misfits)} of "
            f"{len(shaped.layers)}): {'; '.join(misfits[:4])}"
        )
    train = torch.utils.data.ConcatDataset([units[i] for i in train_idx])
    val = torch.utils.data.ConcatDataset([units[i] for i in val_idx]) if val_idx else None
    _check_samples(
        [units[i] for i in train_idx],
        [names[i] for i in train_idx],
        config,
        model.config.patch_size,
    )
    split = {"train": [names[i] for i in train_idx], "validation": [names[i] for i in val_idx]}
    identity = {"data": data_id, "bank": file_sha256(bank_file), "base": base_id}
    return Inputs(train, val, split, shaped, bank_file, model, weights, identity)


def prepare_model(inputs: Inputs, config: FinetuneConfig, device: torch.device) -> nn.Module:
    """Load the base weights, inject the bank and the heads' adapters, move to `device`."""
    model = inputs.model
    if inputs.weights is not None:
        load_checkpoint(model, inputs.weights, strict=True)
    model.to(device)
    inject(model, inputs.bank.to(device))
    a = config.adapter
    if a.heads == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(config.train.seed, 1))  # LoRA A init
            heads = adaptation_targets(model, "paper-subspace").lora
            inject_lora(model, heads, a.lora_rank, a.lora_alpha)
    elif a.heads == "full":
        for name, p in model.named_parameters():
            if name.startswith(HEAD_MODULES) and not name.endswith((".U", ".V")):
                p.requires_grad_(True)
    return model


# -- the run --------------------------------------------------------------------------------------


def run_digest(config: FinetuneConfig, inputs: Inputs) -> str:
    return digest("own-data", config, inputs.identity, inputs.split)


def _printer(enabled: bool):
    """progress(step, total, objective, validation): a line every ~10% of the run and at every
    validation pass."""

    def progress(step: int, total: int, loss: float, val: float | None) -> None:
        if not enabled:
            return
        every = max(1, total // 10)
        if val is None and (step + 1) % every and step + 1 != total:
            return
        line = f"  step {step + 1}/{total}: objective {loss:.4f}"
        print(line + (f", validation {val:.4f}" if val is not None else ""), flush=True)

    return progress


def _write_outputs(out: Path, model: nn.Module, config, history, inputs, base_name: str) -> None:
    export_peft(model, out / ADAPTER_DIR, base_model_name_or_path=base_name)
    if config.adapter.heads == "full":
        tensors = {
            n: p.detach().cpu().contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad and n.startswith(HEAD_MODULES)
        }
        atomic_save_safetensors(tensors, {"adapter.heads": "full"}, out / "heads.safetensors")
    final = history.validation[-1]["objective"] if history.validation else None
    write_json_atomic(
        out / "metrics.json",
        {**history.to_json(), "final_validation": final, "split": inputs.split},
    )


def finetune_on_data(
    *,
    data: str | Path,
    bank: str | Path,
    out: str | Path,
    config: FinetuneConfig,
    preset: Preset,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Fine-tune a bank's M (and the heads, per config.adapter) on the scenes under `data`, into
    `out` (see the module docstring); resumes from OUT/state.safetensors when it holds this
    run's state. Returns metrics.json's content."""
    inputs = check_inputs(Path(data), Path(bank), preset, checkpoint, config)
    return train_checked(inputs, out, config, preset, checkpoint, device, progress)


def train_checked(
    inputs: Inputs,
    out: str | Path,
    config: FinetuneConfig,
    preset: Preset,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """finetune_on_data after check_inputs (the CLI checks the inputs before anything else)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    expected = run_digest(config, inputs)
    with folder_lock(out, out / ".lock"), torch_threads(preset.threads):
        if is_done(out, expected):
            if progress:
                print(f"{out}: this run is finished (same config and inputs); nothing to do")
            return read_json(out / "metrics.json", ("losses",))
        return _run(inputs, out, config, expected, preset, checkpoint, device, progress)


def _run(inputs, out, config, expected, preset, checkpoint, device, progress) -> dict:
    state = out / STATE_FILE
    if state.exists():
        check_state(state, expected)  # another run's state is refused before any work
    (out / MARKER).unlink(missing_ok=True)
    save_config(config, out / "config.toml", header=f"resolved config of {out}")
    sources = {"bank_file": str(inputs.bank_file.resolve()), "preset": preset.name}
    sources["checkpoint"] = None if checkpoint is None else str(Path(checkpoint).resolve())
    record = {**inputs.identity, "sources": sources, "split": inputs.split, "digest": expected}
    write_json_atomic(out / "inputs.json", record)
    dev = torch.device(
        device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    start = time.perf_counter()
    model = prepare_model(inputs, config, dev)
    if progress:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        resumed = " (resuming)" if state.exists() else ""
        if checkpoint is None:
            print(f"finetune: no --checkpoint: preset {preset.name}'s model, freshly initialised")
        print(
            f"finetune: {len(inputs.train)} training / {len(inputs.val or [])} validation "
            f"samples, {n} trainable parameters, on {dev}{resumed}",
            flush=True,
        )
    history = run_training(
        model,
        inputs.train,
        inputs.val,
        config,
        state_path=state,
        digest=expected,
        progress=_printer(progress),
    )
    base_name = str(checkpoint) if checkpoint is not None else f"attrspace-{preset.name}-random"
    _write_outputs(out, model, config, history, inputs, base_name)
    write_marker(out, "own-data", expected, time.perf_counter() - start)
    if progress:
        print(f"adapter: {out / ADAPTER_DIR} (serve it with peft.PeftModel.from_pretrained)")
    return read_json(out / "metrics.json", ("losses",))


def load_run(out: str | Path, device: str = "cpu") -> nn.Module:
    """The adapted model of a --data run folder, rebuilt from its inputs.json (base, bank) and
    config.toml, with the trained tensors of its state.safetensors (the last save)."""
    out = Path(out)
    record = read_json(out / "inputs.json", ("sources", "digest", "split"))
    sources = record["sources"]
    config = load_config(out / "config.toml")
    base = record["base"]
    preset = get_preset(sources["preset"])
    preset = preset.replace(
        model=VGGTConfig.from_dict(base["model"], where=str(out / "inputs.json")),
        seed=base.get("seed", preset.seed),
    )
    raw, _ = read_bank(Path(sources["bank_file"]))
    bank = shaped_bank(raw, config.adapter.rank_cap, config.adapter.scale)
    model, weights, _ = base_model(preset, sources["checkpoint"], config)
    inputs = Inputs(
        None, None, record["split"], bank, Path(sources["bank_file"]), model, weights, {}
    )
    model = prepare_model(inputs, config, torch.device(device))
    tensors = read_state_tensors(out / STATE_FILE, record["digest"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param/{name}"])
    return model.eval()
