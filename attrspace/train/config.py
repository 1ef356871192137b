"""Every setting that shapes a fine-tuning run, as one frozen config (docs/design.md §8).

`FinetuneConfig` holds five frozen sections: `optim` (learning rate per parameter group, weight
decay, clipping, schedule and warm-up), `train` (steps or epochs, batch, frames per scene, image
size, seed, precision, gradient checkpointing, how often the resumable state is saved), `adapter`
(the bank's K cap and scale, what the heads train, their LoRA rank), `validation` (held-out
fraction, cadence) and `loss` (`attrspace.train.losses.LossConfig`).

A config comes from `resolve_config(base=..., file=..., overrides=...)`: the base (a preset's
defaults, `preset_defaults` in attrspace.pipeline.presets), then a TOML or YAML file, then
`section.key=value` overrides. A key that does not exist or a value of the wrong type is refused
with a `ConfigError` of one line that lists every valid key and its type. `config_toml` writes a
config as TOML (what `attrspace config --preset NAME` prints and what a run folder keeps in
`config.toml`); `save_config` writes it atomically and reads it back before returning.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attrspace.train.losses import LossConfig
from attrspace.util.files import BadFileError, atomic_write_bytes, read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli (a conditional dependency)
    import tomli as tomllib

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
HEAD_MODES = ("lora", "none", "full")


class ConfigError(ValueError):
    """A config file or override that cannot work (the message is one line)."""


@dataclass(frozen=True)
class OptimSettings:
    """Peak learning rate per parameter group: lr_m for the bank's K x K matrices M, lr_lora for
    LoRA factors, lr_full for plain parameters that train (heads = "full", and the pipeline's
    "full" method). AdamW weight decay, gradient-norm clip (0: none), schedule after a linear
    warm-up over `warmup` of the steps (cosine or linear decay to final_lr_ratio x peak, or
    constant)."""

    lr_m: float = 1e-3
    lr_lora: float = 1e-3
    lr_full: float = 1e-4
    weight_decay: float = 0.05
    clip: float = 1.0
    schedule: str = "cosine"
    warmup: float = 0.05
    final_lr_ratio: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("lr_m", "lr_lora", "lr_full"):
            _require(f"optim.{name}", getattr(self, name), lambda v: v > 0, "> 0")
        _require("optim.weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0")
        _require("optim.clip", self.clip, lambda v: v >= 0, ">= 0 (0: no clipping)")
        _require("optim.schedule", self.schedule, lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
        _require("optim.warmup", self.warmup, lambda v: 0 <= v < 1, "in [0, 1)")
        _require("optim.final_lr_ratio", self.final_lr_ratio, lambda v: 0 < v <= 1, "in (0, 1]")


@dataclass(frozen=True)
class TrainSettings:
    """steps, or epochs > 0 (passes over the training samples; steps is then ignored); scenes per
    batch; frames: views per sample (0: every view of a scene); image_size: resize every view to
    this square side (0: as stored; a multiple of the patch size); seed of the split, the frame
    draws, the batch order and the adapters' init; precision of the forward ("bf16": autocast,
    M and the LoRA factors stay float32); gradient checkpointing of the aggregator and heads;
    save_every: steps between saves of the resumable state (it is also saved at the end)."""

    steps: int = 100
    epochs: float = 0.0
    batch_size: int = 1
    frames: int = 0
    image_size: int = 0
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    save_every: int = 50

    def __post_init__(self) -> None:
        _require("train.steps", self.steps, lambda v: v >= 1, ">= 1")
        _require("train.epochs", self.epochs, lambda v: v >= 0, ">= 0 (0: use steps)")
        _require("train.batch_size", self.batch_size, lambda v: v >= 1, ">= 1")
        _require("train.frames", self.frames, lambda v: v == 0 or v >= 2, "0 or >= 2")
        _require("train.image_size", self.image_size, lambda v: v >= 0, ">= 0")
        _require("train.seed", self.seed, lambda v: 0 <= v < 2**63, "in [0, 2**63)")
        _require("train.precision", self.precision, lambda v: v in PRECISIONS, f"in {PRECISIONS}")
        _require("train.save_every", self.save_every, lambda v: v >= 1, ">= 1")


@dataclass(frozen=True)
class AdapterSettings:
    """rank_cap: keep at most this many columns of each bank layer (the first ones; 0: the bank's
    K); scale: the adapter scale s (0: the bank's own); heads: "lora" (LoRA of lora_rank and
    lora_alpha on the camera and depth heads, the paper's setting), "none" (the bank alone) or
    "full" (every head parameter trains at optim.lr_full)."""

    rank_cap: int = 0
    scale: float = 0.0
    heads: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0

    def __post_init__(self) -> None:
        _require("adapter.rank_cap", self.rank_cap, lambda v: v >= 0, ">= 0 (0: the bank's K)")
        _require("adapter.scale", self.scale, lambda v: v >= 0, ">= 0 (0: the bank's scale)")
        _require("adapter.heads", self.heads, lambda v: v in HEAD_MODES, f"one of {HEAD_MODES}")
        _require("adapter.lora_rank", self.lora_rank, lambda v: v >= 1, ">= 1")
        _require("adapter.lora_alpha", self.lora_alpha, lambda v: v > 0, "> 0")


@dataclass(frozen=True)
class ValidationSettings:
    """fraction: share of the scenes held out for validation (whole scenes, a seeded draw,
    disjoint from training; 0: none); every: steps between validation passes (0: at the end
    only); max_samples: validation samples per pass at most (0: all)."""

    fraction: float = 0.2
    every: int = 25
    max_samples: int = 0

    def __post_init__(self) -> None:
        _require("validation.fraction", self.fraction, lambda v: 0 <= v < 1, "in [0, 1)")
        _require("validation.every", self.every, lambda v: v >= 0, ">= 0 (0: at the end)")
        _require("validation.max_samples", self.max_samples, lambda v: v >= 0, ">= 0 (0: all)")


@dataclass(frozen=True)
class FinetuneConfig:
    """The whole fine-tuning setting (see the module docstring); frozen, compared by value."""

    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, dict]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def replace(self, **sections) -> FinetuneConfig:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {
    "optim": OptimSettings,
    "train": TrainSettings,
    "adapter": AdapterSettings,
    "validation": ValidationSettings,
    "loss": LossConfig,
}


def _require(key: str, value, ok, what: str) -> None:
    if not ok(value):
        raise ConfigError(f"{key} must be {what}, got {value!r}")


def _type_names() -> dict[str, str]:
    """'section.key' -> its type as written in the dataclass ('float', 'str | None', ...)."""
    names = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            names[f"{section}.{f.name}"] = (
                "str | None" if hint == (str | None) else getattr(hint, "__name__", str(hint))
            )
    return names


def valid_keys() -> str:
    """Every key with its type, for error messages: 'optim.lr_m (float), ...'."""
    return ", ".join(f"{k} ({t})" for k, t in _type_names().items())


def _checked_value(key: str, kind: str, value):
    """`value` as the type of `key`, or ConfigError (an int is a float; nothing else converts)."""
    if kind == "str | None":
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        kind = "str"
    expected = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[kind]
    wrong = isinstance(value, bool) and kind != "bool"
    if wrong or not isinstance(value, expected):
        hint = ""
        if kind == "float" and isinstance(value, str):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
        raise ConfigError(
            f"{key}: expected {kind}, got {value!r} ({type(value).__name__}){hint}; "
            f"valid keys: {valid_keys()}"
        )
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
    return value


def _merge(values: dict[str, dict], data: dict, origin: str) -> None:
    """Merge a nested {section: {key: value}} mapping into `values` (checked key by key)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a table of sections, got {type(data).__name__}")
    kinds = _type_names()
    for section, entries in data.items():
        if section not in SECTIONS or not isinstance(entries, dict):
            what = "unknown section" if section not in SECTIONS else "not a table:"
            raise ConfigError(f"{origin}: {what} {section!r}; valid keys: {valid_keys()}")
        for key, value in entries.items():
            dotted = f"{section}.{key}"
            if dotted not in kinds:
                raise ConfigError(f"{origin}: unknown key {dotted!r}; valid keys: {valid_keys()}")
            values[section][key] = _checked_value(dotted, kinds[dotted], value)


def from_dict(
    data: dict, base: FinetuneConfig | None = None, origin: str = "config"
) -> FinetuneConfig:
    """`base` (default: FinetuneConfig()) with the keys of the nested mapping `data` replaced."""
    values = (base or FinetuneConfig()).to_dict()
    _merge(values, data, origin)
    return _build(values, origin)


def _build(values: dict[str, dict], origin: str) -> FinetuneConfig:
    try:
        return FinetuneConfig(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {' '.join(str(exc).split())}") from None


def read_config_file(path: str | Path) -> dict:
    """The nested mapping of a .toml, .yaml or .yml file (ConfigError naming the file)."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: a config file ends in .toml, .yaml or .yml")
    try:
        text = read_text(path)  # the bounded reader: a FIFO or a device is refused, not read
    except BadFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return {} if data is None else data


def parse_override(text: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, value); the value is read as a TOML value (1e-3,
    true, "text") and taken as a plain string when it is not one (--set optim.schedule=linear)."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep or dotted.count(".") != 1:
        raise ConfigError(f"--set {text!r}: expected section.key=value; valid keys: {valid_keys()}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    section, key = dotted.split(".")
    return section, key, value


def resolve_config(
    *,
    base: FinetuneConfig | None = None,
    file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> FinetuneConfig:
    """base, then the file's keys, then each `section.key=value` override, in that order."""
    config = base or FinetuneConfig()
    if file is not None:
        config = from_dict(read_config_file(file), config, origin=str(file))
    for text in overrides:
        section, key, value = parse_override(text)
        config = from_dict({section: {key: value}}, config, origin=f"--set {text}")
    return config


def _toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_toml(config: FinetuneConfig, header: str = "") -> str:
    """The config as TOML, one table per section (reads back equal through tomllib)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section, values in config.to_dict().items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(config: FinetuneConfig, path: str | Path, header: str = "") -> None:
    """Write `config` as TOML atomically, then read it back: a file that does not give the same
    config is an error, never left for a resumed run to trust."""
    atomic_write_bytes(Path(path), config_toml(config, header).encode())
    if load_config(path) != config:
        raise ConfigError(f"{path}: reads back as another config")


def load_config(path: str | Path) -> FinetuneConfig:
    """A config file on its own (keys missing from it take FinetuneConfig's defaults)."""
    return from_dict(read_config_file(path), origin=str(path))
