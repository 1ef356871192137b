"""The state one pipeline invocation shares between stages: output folder, preset, device, data
cache, progress bars, the base model's source and a log of what ran and what came from the cache."""

from __future__ import annotations

import contextlib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from attrspace.backends.registry import ENV_FORCE, check_forced_name
from attrspace.data import MultiViewDataset, read_manifest
from attrspace.models.vggt.checkpoint import load_checkpoint
from attrspace.models.vggt.model import VGGT
from attrspace.pipeline.cache import MARKER, StageFileError, digest
from attrspace.pipeline.presets import Preset
from attrspace.util.files import BadFileError, regular_file

BASE_FILE = "model.safetensors"
DIGEST_KEY = "attrspace_digest"
RUNS_FILE = "runs.json"  # OUT/runs.json: one record per command run on the folder


class RunInputError(ValueError):
    """An input of a run that cannot work: a missing checkpoint or LoRA folder, a preset that needs
    a device this machine lacks. The CLI prints it as one line."""


def check_environment() -> None:
    """The environment variables a run reads, checked before any stage runs (a bad
    ATTRSPACE_BACKEND would otherwise surface at the first adapted layer, after hours of work)."""
    try:
        check_forced_name(os.environ.get(ENV_FORCE))
    except ValueError as exc:
        raise RunInputError(str(exc)) from None


def check_run_folder(out: str | os.PathLike) -> Path:
    """`out` as a run folder to report on: one that a pipeline command wrote into (its run log or a
    stage marker is there); RunInputError naming the path otherwise."""
    out = Path(out)
    if not out.is_dir():
        raise RunInputError(f"{out}: no such run folder")
    if (out / RUNS_FILE).exists() or any(out.glob(f"*/{MARKER}")) or any(out.glob(f"*/*/{MARKER}")):
        return out
    raise RunInputError(
        f"{out}: not a run folder (no {RUNS_FILE} and no finished stage); "
        f"run `attrspace run --out {shlex.quote(str(out))}` first"
    )


def command_line(*words) -> str:
    """A command a user can paste into a shell: each word quoted where it needs it (paths with
    spaces, quotes or $)."""
    return shlex.join(str(w) for w in words)


@dataclass
class Workspace:
    """out: the run folder; checkpoint: a local official VGGT file (presets without pre-training);
    loras_dir: LoRAs trained elsewhere, laid out as DIR/<attribute>/<dataset>/ (peft folders);
    progress: show tqdm bars; events: (stage key, "ran" | "cached") in the order they happened."""

    out: Path
    preset: Preset
    checkpoint: Path | None = None
    loras_dir: Path | None = None
    progress: bool = True
    events: list[tuple[str, str]] = field(default_factory=list)
    # Jobs another rank ran in this invocation (attrspace.pipeline.spread): found cached, but done now.
    ran_elsewhere: set[str] = field(default_factory=set, repr=False)
    _scenes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        check_environment()
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
            if not self.checkpoint.is_file():
                raise RunInputError(f"checkpoint not found: {self.checkpoint}")
        if self.preset.needs_checkpoint and self.checkpoint is None:
            raise RunInputError(
                f"preset {self.preset.name!r} has no pre-training stage: pass --checkpoint "
                "with a local official VGGT weights file"
            )
        if self.loras_dir is not None:
            self.loras_dir = Path(self.loras_dir)
            if not self.loras_dir.is_dir():
                raise RunInputError(f"LoRA folder not found: {self.loras_dir}")
        self.device  # noqa: B018 -- a preset that needs CUDA fails here, before any work

    # -- device and progress ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        wanted = self.preset.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            raise RunInputError(
                f"preset {self.preset.name!r} runs on CUDA and this machine has no CUDA device; "
                "pass --device cpu"
            )
        if wanted == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        return torch.device(wanted)

    def bar(self, total: int, desc: str):
        """A tqdm progress bar (disabled when progress is off)."""
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True
        )

    def redo_command(self, stage: str) -> str:
        """The command line that redoes `stage` of this run (for errors about files that a later
        stage cannot redo itself)."""
        words = ["attrspace", stage, "--preset", self.preset.name, "--out", self.out]
        if self.checkpoint is not None:
            words += ["--checkpoint", self.checkpoint]
        return command_line(*words)

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)

    def record(self, key: str, status: str) -> None:
        if status == "cached" and key in self.ran_elsewhere:
            status = "ran"
        self.events.append((key, status))
        if status == "cached":
            self.say(f"  {key}: cached")

    def ran(self, prefix: str = "") -> list[str]:
        """Keys of the work done (not taken from the cache) in this invocation."""
        return [k for k, s in self.events if s == "ran" and k.startswith(prefix)]

    # -- data -------------------------------------------------------------------------------------

    def family_dir(self, family: str) -> Path:
        return self.out / "data" / family

    def dataset_names(self, family: str) -> list[str]:
        return [d["name"] for d in read_manifest(self.family_dir(family))["datasets"]]

    def scenes(self, family: str, datasets: list[str] | None = None) -> list[dict]:
        """Every scene sample of a rendered family (or of some of its datasets), read once and
        verified against the manifest's checksums, then kept in memory for later stages."""
        key = (family, tuple(datasets) if datasets else None)
        if key not in self._scenes:
            data = MultiViewDataset(self.family_dir(family), datasets=datasets)
            self._scenes[key] = [data[i] for i in range(len(data))]
        return self._scenes[key]

    # -- the base model ---------------------------------------------------------------------------

    def base_file(self) -> Path:
        return self.checkpoint if self.preset.needs_checkpoint else self.out / "base" / BASE_FILE

    def new_model(self) -> VGGT:
        """A freshly initialised model of the preset (seeded), on the run's device."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.preset.seed)
            return VGGT(self.preset.model).to(self.device)

    def load_base(self, expected_digest: str | None = None) -> VGGT:
        """The base model: the pre-trained weights of this run (their digest checked against
        `expected_digest`) or the official checkpoint. Every key and shape is validated."""
        path = self.base_file()
        if not self.preset.needs_checkpoint and expected_digest is not None:
            try:
                regular_file(path)  # a FIFO would block safe_open; a device, map it
                with safe_open(str(path), framework="pt") as f:
                    stored = (f.metadata() or {}).get(DIGEST_KEY)
            except BadFileError as exc:
                raise StageFileError(
                    f"{exc}; `{self.redo_command('pretrain')}` redoes the base weights"
                ) from None
            except Exception as exc:
                raise StageFileError(
                    f"{path}: cannot read the base weights ({exc}); "
                    f"`{self.redo_command('pretrain')}` redoes them"
                ) from exc
            if stored != expected_digest:
                raise StageFileError(
                    f"{path}: weights were written for another configuration "
                    f"({str(stored)[:12]} != {expected_digest[:12]}); "
                    f"`{self.redo_command('pretrain')}` redoes them"
                )
        if self.preset.needs_checkpoint:
            with torch.device("meta"):
                model = VGGT(self.preset.model)
        else:
            model = VGGT(self.preset.model)
        load_checkpoint(model, path, strict=True)
        return model.to(self.device)

    def checkpoint_identity(self) -> str:
        """Digest of the checkpoint by path, size and modification time (hashing 5 GB on every run
        would cost more than the check is worth)."""
        stat = self.checkpoint.stat()
        return digest("checkpoint", str(self.checkpoint.resolve()), stat.st_size, stat.st_mtime_ns)


@contextlib.contextmanager
def torch_threads(n: int):
    """Use n intra-op threads inside the block (n = 0 leaves torch's setting)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
