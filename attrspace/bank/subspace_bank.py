"""SubspaceBank: the mined bases per adapted layer, and its files.

File layout (safetensors), schema version 2:
    layers.<name>.U                (d_out, K)   column basis
    layers.<name>.V                (d_in, K)    row basis
    layers.<name>.column_attribute (K,) int64   index into the bank's attributes, per column
    layers.<name>.singular_values  (K,)         optional
    metadata["attrspace"]          JSON header: schema_version, model_config, attributes, scale,
                                   orthonormal, extra, and per layer d_in, d_out, K
    metadata["attrspace_sha256"]   sha256 over the tensors AND the header text, so a flipped bit in
                                   any number, name or flag of the header is caught like one in a tensor
Every header key is required and checked by type and range on load; unknown keys are refused.
Version 1 files kept the header outside the checksum and are refused by `load` (the header cannot be
trusted); `upgrade_v1_file` rewrites one after showing what it keeps.
The official release's layout (keys `frame_blocks.attn.qkv.0.A` = V^T (K, d_in) and `.B` = U (d_out, K))
is read by `load_official` and written by `save_official`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attrspace.bank.checks import (
    HEADER_FIELDS,
    check_against_bank,
    check_attributes,
    check_extra,
    check_header,
    check_tensors,
    target_device,
)
from attrspace.util.checks import positive_finite, positive_int
from attrspace.util.files import atomic_save_safetensors, checksum, read_safetensors

SCHEMA_VERSION = 2
_HEADER_KEY = "attrspace"
_SHA_KEY = "attrspace_sha256"
_OFFICIAL_KEY = re.compile(
    r"^(frame_blocks|global_blocks)\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.(\d+)\.(A|B)$"
)


class BankFileError(ValueError):
    """A bank file that cannot be read or does not hold a valid bank."""


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        return read_safetensors(path)
    except ValueError as exc:
        raise BankFileError(str(exc)) from exc


def _digest(tensors: dict[str, Tensor], header_text: str) -> str:
    return hashlib.sha256(f"{checksum(tensors)}\n{header_text}".encode()).hexdigest()


@dataclass
class LayerSubspace:
    """Bases of one adapted layer. U: (d_out, K), V: (d_in, K), column_attribute: (K,) int64.

    The tensors are checked on construction (and again by `SubspaceBank.validate`): float, finite,
    one shared K > 0, one dtype and device.
    """

    U: Tensor
    V: Tensor
    column_attribute: Tensor
    singular_values: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensors(self)

    @property
    def d_out(self) -> int:
        return self.U.shape[0]

    @property
    def d_in(self) -> int:
        return self.V.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[1]


@dataclass
class SubspaceBank:
    """Per adapted layer (qualified module name) the frozen bases U, V and their provenance.

    attributes: names indexed by each layer's column_attribute; scale: the adapter scale s used when the
    bank is injected (finite, > 0); orthonormal: whether U and V have orthonormal columns (checked);
    extra: JSON-compatible provenance (str keys) kept in the file.
    """

    layers: dict[str, LayerSubspace]
    attributes: tuple[str, ...] = ("unlabelled",)
    model_config: str = ""
    scale: float = 1.0
    orthonormal: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.attributes, str) or not isinstance(self.attributes, (list, tuple)):
            raise TypeError(
                f"attributes must be a list or tuple of names, got {type(self.attributes).__name__}"
                f" {self.attributes!r}"
            )
        self.attributes = tuple(self.attributes)
        self.scale = positive_finite("scale", self.scale, "SubspaceBank")
        self.validate()

    def validate(self) -> None:
        """Check every field and layer again (the dataclass is mutable): raises naming the fault."""
        check_attributes(self.attributes)
        if not isinstance(self.model_config, str):
            raise TypeError(f"model_config must be a str, got {type(self.model_config).__name__}")
        positive_finite("scale", self.scale, "SubspaceBank")
        if not isinstance(self.orthonormal, bool):
            raise TypeError(f"orthonormal must be a bool, got {self.orthonormal!r}")
        check_extra(self.extra)
        if not isinstance(self.layers, dict) or not self.layers:
            raise ValueError("a bank needs a dict of at least one layer name -> LayerSubspace")
        for name, layer in self.layers.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"layer names must be non-empty str, got {name!r}")
            if not isinstance(layer, LayerSubspace):
                raise TypeError(
                    f"layer {name}: must be a LayerSubspace, got {type(layer).__name__}"
                )
            try:
                check_tensors(layer)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"layer {name}: {exc}") from exc
            check_against_bank(name, layer, len(self.attributes), self.orthonormal)

    def ranks(self, name: str) -> dict[str, int]:
        """Columns per attribute in layer `name`."""
        counts = torch.bincount(self.layers[name].column_attribute, minlength=len(self.attributes))
        return {a: int(c) for a, c in zip(self.attributes, counts, strict=False)}

    def trainable_params(self) -> int:
        return sum(layer.rank**2 for layer in self.layers.values())

    # -- the package's own format ------------------------------------------------------------------

    def _header(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model_config": self.model_config,
            "attributes": list(self.attributes),
            "scale": self.scale,
            "orthonormal": self.orthonormal,
            "extra": self.extra,
            "layers": {
                n: {"d_in": x.d_in, "d_out": x.d_out, "K": x.rank} for n, x in self.layers.items()
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """Validate, then write the bank atomically (temp file + rename) as safetensors."""
        self.validate()
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"layers.{name}.U"] = layer.U.detach().cpu().contiguous()
            tensors[f"layers.{name}.V"] = layer.V.detach().cpu().contiguous()
            tensors[f"layers.{name}.column_attribute"] = layer.column_attribute.cpu().contiguous()
            if layer.singular_values is not None:
                tensors[f"layers.{name}.singular_values"] = (
                    layer.singular_values.detach().cpu().contiguous()
                )
        text = json.dumps(self._header(), allow_nan=False)
        metadata = {_HEADER_KEY: text, _SHA_KEY: _digest(tensors, text)}
        atomic_save_safetensors(tensors, metadata, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SubspaceBank:
        """Read and validate a bank written by `save`; any fault raises BankFileError naming it.

        The file is checked on the CPU; the tensors then move to `device` (which must exist here).
        """
        target = target_device(device)
        path = Path(path)
        tensors, metadata = _read(path)
        header = _read_header(path, tensors, metadata)
        bank = _bank_from(path, tensors, header)
        return bank if target.type == "cpu" else bank.to(target)

    def to(self, device: str | torch.device) -> SubspaceBank:
        """A copy of the bank with every tensor on `device`."""
        target = target_device(device)

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(target)

        layers = {
            n: LayerSubspace(
                move(x.U), move(x.V), move(x.column_attribute), move(x.singular_values)
            )
            for n, x in self.layers.items()
        }
        return SubspaceBank(
            layers, self.attributes, self.model_config, self.scale, self.orthonormal, self.extra
        )

    # -- the official release's layout --------------------------------------------------------------

    @classmethod
    def load_official(
        cls, path: str | os.PathLike, scale: float = 2.0, prefix: str = "aggregator."
    ) -> SubspaceBank:
        """Read a bank in the official release's layout: `{frame|global}_blocks.{attn|mlp}.{name}.{i}.A`
        (K, d_in) = V^T and `.B` (d_out, K) = U. Layers become `{prefix}{frame|global}_blocks.{i}.{attn|mlp}.{name}`.
        The release trains with s = lora_alpha / r = 2, the default `scale`."""
        scale = positive_finite("scale", scale, "load_official")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        path = Path(path)
        tensors, _ = _read(path)
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            match = _OFFICIAL_KEY.match(key)
            if match is None:
                raise BankFileError(f"{path}: key {key!r} is not in the official layout")
            blocks, group, proj, index, part = match.groups()
            pairs.setdefault(f"{prefix}{blocks}.{index}.{group}.{proj}", {})[part] = t
        if not pairs:
            raise BankFileError(f"{path}: holds no tensors")
        layers = {}
        for name, pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise BankFileError(f"{path}: layer {name}: has only {sorted(pair)}, needs A and B")
            A, B = pair["A"], pair["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise BankFileError(
                    f"{path}: layer {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not share K"
                )
            try:
                layers[name] = LayerSubspace(
                    U=B,
                    V=A.t().contiguous(),
                    column_attribute=torch.zeros(A.shape[0], dtype=torch.int64),
                )
            except (TypeError, ValueError) as exc:
                raise BankFileError(f"{path}: layer {name}: {exc}") from exc
        try:
            return cls(
                layers=layers, attributes=("unlabelled",), model_config="vggt-official", scale=scale
            )
        except (TypeError, ValueError) as exc:
            raise BankFileError(f"{path}: {exc}") from exc

    def save_official(self, path: str | os.PathLike, prefix: str = "aggregator.") -> None:
        """Write the official release's layout (bases only; attributes and scale are not kept)."""
        self.validate()
        pattern = re.compile(
            rf"^{re.escape(prefix)}(frame_blocks|global_blocks)\.(\d+)\.(attn|mlp)\.(qkv|proj|fc1|fc2)$"
        )
        tensors = {}
        for name, layer in self.layers.items():
            match = pattern.match(name)
            if match is None:
                raise ValueError(
                    f"layer {name!r} has no key in the official layout (VGGT block linears only)"
                )
            blocks, index, group, proj = match.groups()
            key = f"{blocks}.{group}.{proj}.{index}"
            tensors[f"{key}.A"] = layer.V.detach().t().contiguous().cpu()
            tensors[f"{key}.B"] = layer.U.detach().contiguous().cpu()
        atomic_save_safetensors(tensors, None, Path(path))


def upgrade_v1_file(src: str | os.PathLike, dst: str | os.PathLike) -> SubspaceBank:
    """Rewrite a schema-1 bank file as schema 2 and return the bank.

    Schema 1 checksummed the tensors only, so its header (scale, attributes, orthonormal) cannot be
    verified: check the printed header before trusting the result. The header is still validated by
    type and range, and the tensors against their checksum.
    """
    src, dst = Path(src), Path(dst)
    tensors, metadata = _read(src)
    if set(metadata) != {_HEADER_KEY}:
        raise BankFileError(f"{src}: not a schema-1 bank (metadata keys {sorted(metadata)})")
    header = _parse_json(src, metadata[_HEADER_KEY])
    if header.get("schema_version") != 1:
        raise BankFileError(f"{src}: schema version {header.get('schema_version')!r}, not 1")
    if header.pop("sha256", None) != checksum(tensors):
        raise BankFileError(f"{src}: tensor data does not match the checksum written with it")
    header["schema_version"] = SCHEMA_VERSION
    _checked_header(src, header)
    bank = _bank_from(src, tensors, header)
    print(f"{src}: keeping header {json.dumps({k: header[k] for k in HEADER_FIELDS})}")
    bank.save(dst)
    return bank


# -- reading helpers ------------------------------------------------------------------------------


def _parse_json(path: Path, text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not a JSON number")

    try:
        header = json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        raise BankFileError(f"{path}: bank metadata is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise BankFileError(
            f"{path}: bank metadata must be a JSON object, got {type(header).__name__}"
        )
    return header


def _read_header(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict:
    """The header, once its version is known and the checksum holds; then checked field by field."""
    if _HEADER_KEY not in metadata:
        raise BankFileError(
            f"{path}: no 'attrspace' metadata; not a bank file (official layout? use load_official)"
        )
    header = _parse_json(path, metadata[_HEADER_KEY])
    version = header.get("schema_version")
    if version == 1:
        raise BankFileError(
            f"{path}: schema version 1 keeps its metadata (scale, attributes, orthonormal) outside "
            "the checksum, so it cannot be verified; if you trust this file, rewrite it once with "
            "attrspace.bank.upgrade_v1_file(old_path, new_path)"
        )
    if version != SCHEMA_VERSION:
        raise BankFileError(
            f"{path}: schema version {version!r}, this attrspace reads {SCHEMA_VERSION}"
        )
    unknown = sorted(set(metadata) - {_HEADER_KEY, _SHA_KEY})
    if unknown or _SHA_KEY not in metadata:
        what = f"unknown metadata keys {unknown}" if unknown else f"no '{_SHA_KEY}' metadata"
        raise BankFileError(f"{path}: {what}")
    if metadata[_SHA_KEY] != _digest(tensors, metadata[_HEADER_KEY]):
        raise BankFileError(
            f"{path}: tensors or metadata do not match the checksum written with them "
            "(tampered or corrupt)"
        )
    _checked_header(path, header)
    return header


def _checked_header(path: Path, header: dict) -> None:
    try:
        check_header(header)
    except (TypeError, ValueError) as exc:
        raise BankFileError(f"{path}: bank metadata: {exc}") from exc


def _bank_from(path: Path, tensors: dict[str, Tensor], header: dict) -> SubspaceBank:
    expected = set()
    layers = {}
    for name, dims in header["layers"].items():
        keys = {k: f"layers.{name}.{k}" for k in ("U", "V", "column_attribute", "singular_values")}
        for k in ("U", "V", "column_attribute"):
            if keys[k] not in tensors:
                raise BankFileError(f"{path}: layer {name}: tensor {k} is missing")
        expected.update(k for k in keys.values() if k in tensors)
        try:
            layer = LayerSubspace(
                U=tensors[keys["U"]],
                V=tensors[keys["V"]],
                column_attribute=tensors[keys["column_attribute"]],
                singular_values=tensors.get(keys["singular_values"]),
            )
        except (TypeError, ValueError) as exc:
            raise BankFileError(f"{path}: layer {name}: {exc}") from exc
        got = {"d_in": layer.d_in, "d_out": layer.d_out, "K": layer.rank}
        if got != dims:
            raise BankFileError(
                f"{path}: layer {name}: tensors have dims {got}, metadata says {dims}"
            )
        layers[name] = layer
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise BankFileError(f"{path}: tensors not described by the metadata: {unexpected[:5]}")
    try:
        return SubspaceBank(
            layers=layers,
            attributes=tuple(header["attributes"]),
            model_config=header["model_config"],
            scale=header["scale"],
            orthonormal=header["orthonormal"],
            extra=header["extra"],
        )
    except (TypeError, ValueError) as exc:
        raise BankFileError(f"{path}: {exc}") from exc


def random_bank(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    *,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SubspaceBank:
    """A bank of random orthonormal bases (the RANDOM control), K = `rank` columns per layer.

    shapes: layer name -> (d_out, d_in). Deterministic for a given seed.
    """
    rank = positive_int("rank", rank, "random_bank")
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (d_out, d_in) in shapes.items():
        if rank > min(d_out, d_in):
            raise ValueError(
                f"layer {name}: K={rank} exceeds min(d_out, d_in) = {min(d_out, d_in)}"
            )
        U = torch.linalg.qr(torch.randn(d_out, rank, generator=generator, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))[0]
        layers[name] = LayerSubspace(U.to(dtype), V.to(dtype), torch.zeros(rank, dtype=torch.int64))
    return SubspaceBank(
        layers, attributes=("random",), model_config="random", scale=scale, orthonormal=True
    )


def linear_shapes(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every plain nn.Linear whose name equals or ends with one of `targets`."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and any(name == t or name.endswith("." + t) for t in targets)
    }
