"""SubspaceBank: the mined bases per adapted layer, and its files.

File layout (safetensors), schema version 1:
    layers.<name>.U                (d_out, K)   column basis
    layers.<name>.V                (d_in, K)    row basis
    layers.<name>.column_attribute (K,) int64   index into the bank's attributes, per column
    layers.<name>.singular_values  (K,)         optional
    metadata["attrspace"]          JSON: schema_version, model_config, attributes, scale, orthonormal,
                                   per layer d_in, d_out, K, and a sha256 of all tensors (all checked on load)
The official release's layout (keys `frame_blocks.attn.qkv.0.A` = V^T (K, d_in) and `.B` = U (d_out, K))
is read by `load_official` and written by `save_official`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ._io import atomic_save_safetensors, checksum, read_safetensors

SCHEMA_VERSION = 1
_ORTHONORMAL_TOL = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}
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


@dataclass
class LayerSubspace:
    """Bases of one adapted layer. U: (d_out, K), V: (d_in, K), column_attribute: (K,) int64."""

    U: Tensor
    V: Tensor
    column_attribute: Tensor
    singular_values: Tensor | None = None

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
    bank is injected; orthonormal: whether U and V have orthonormal columns (checked on load).
    """

    layers: dict[str, LayerSubspace]
    attributes: tuple[str, ...] = ("unlabelled",)
    model_config: str = ""
    scale: float = 1.0
    orthonormal: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attributes = tuple(self.attributes)
        for name, layer in self.layers.items():
            _validate_layer(name, layer, len(self.attributes), self.orthonormal)

    def ranks(self, name: str) -> dict[str, int]:
        """Columns per attribute in layer `name`."""
        counts = torch.bincount(self.layers[name].column_attribute, minlength=len(self.attributes))
        return {a: int(c) for a, c in zip(self.attributes, counts, strict=False)}

    def trainable_params(self) -> int:
        return sum(layer.rank**2 for layer in self.layers.values())

    # -- the package's own format ------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank atomically (temp file + rename) as safetensors."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"layers.{name}.U"] = layer.U.detach().cpu().contiguous()
            tensors[f"layers.{name}.V"] = layer.V.detach().cpu().contiguous()
            tensors[f"layers.{name}.column_attribute"] = layer.column_attribute.cpu().to(
                torch.int64
            )
            if layer.singular_values is not None:
                tensors[f"layers.{name}.singular_values"] = layer.singular_values.detach().cpu()
        header = {
            "schema_version": SCHEMA_VERSION,
            "model_config": self.model_config,
            "attributes": list(self.attributes),
            "scale": self.scale,
            "orthonormal": self.orthonormal,
            "extra": self.extra,
            "layers": {
                n: {"d_in": x.d_in, "d_out": x.d_out, "K": x.rank} for n, x in self.layers.items()
            },
            "sha256": checksum(tensors),
        }
        atomic_save_safetensors(tensors, {"attrspace": json.dumps(header)}, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SubspaceBank:
        """Read and validate a bank written by `save`; any fault raises BankFileError naming it."""
        path = Path(path)
        tensors, metadata = _read(path)
        if "attrspace" not in metadata:
            raise BankFileError(
                f"{path}: no 'attrspace' metadata; not a bank file (official layout? use load_official)"
            )
        try:
            header = json.loads(metadata["attrspace"])
            version = header["schema_version"]
            declared = header["layers"]
            attributes = tuple(header["attributes"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BankFileError(f"{path}: malformed bank metadata ({exc})") from exc
        if version != SCHEMA_VERSION:
            raise BankFileError(
                f"{path}: schema version {version}, this attrspace reads {SCHEMA_VERSION}"
            )
        if header.get("sha256") != checksum(tensors):
            raise BankFileError(
                f"{path}: tensor data does not match the checksum written with it (tampered or corrupt)"
            )
        expected = set()
        layers = {}
        for name, dims in declared.items():
            keys = {
                k: f"layers.{name}.{k}" for k in ("U", "V", "column_attribute", "singular_values")
            }
            for k in ("U", "V", "column_attribute"):
                if keys[k] not in tensors:
                    raise BankFileError(f"{path}: layer {name}: tensor {k} is missing")
            expected.update(k for k in keys.values() if k in tensors)
            layer = LayerSubspace(
                U=tensors[keys["U"]].to(device),
                V=tensors[keys["V"]].to(device),
                column_attribute=tensors[keys["column_attribute"]].to(device),
                singular_values=tensors[keys["singular_values"]].to(device)
                if keys["singular_values"] in tensors
                else None,
            )
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
            return cls(
                layers=layers,
                attributes=attributes,
                model_config=header.get("model_config", ""),
                scale=float(header.get("scale", 1.0)),
                orthonormal=bool(header.get("orthonormal", False)),
                extra=header.get("extra", {}),
            )
        except ValueError as exc:
            raise BankFileError(f"{path}: {exc}") from exc

    # -- the official release's layout --------------------------------------------------------------

    @classmethod
    def load_official(
        cls, path: str | os.PathLike, scale: float = 2.0, prefix: str = "aggregator."
    ) -> SubspaceBank:
        """Read a bank in the official release's layout: `{frame|global}_blocks.{attn|mlp}.{name}.{i}.A`
        (K, d_in) = V^T and `.B` (d_out, K) = U. Layers become `{prefix}{frame|global}_blocks.{i}.{attn|mlp}.{name}`.
        The release trains with s = lora_alpha / r = 2, the default `scale`."""
        path = Path(path)
        tensors, _ = _read(path)
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            match = _OFFICIAL_KEY.match(key)
            if match is None:
                raise BankFileError(f"{path}: key {key!r} is not in the official layout")
            blocks, group, proj, index, part = match.groups()
            pairs.setdefault(f"{prefix}{blocks}.{index}.{group}.{proj}", {})[part] = t
        layers = {}
        for name, pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise BankFileError(f"{path}: layer {name}: has only {sorted(pair)}, needs A and B")
            A, B = pair["A"], pair["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise BankFileError(
                    f"{path}: layer {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not share K"
                )
            K = A.shape[0]
            layers[name] = LayerSubspace(
                U=B, V=A.t().contiguous(), column_attribute=torch.zeros(K, dtype=torch.int64)
            )
        try:
            return cls(
                layers=layers, attributes=("unlabelled",), model_config="vggt-official", scale=scale
            )
        except ValueError as exc:
            raise BankFileError(f"{path}: {exc}") from exc

    def save_official(self, path: str | os.PathLike, prefix: str = "aggregator.") -> None:
        """Write the official release's layout (bases only; attributes and scale are not kept)."""
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


def _validate_layer(name: str, layer: LayerSubspace, n_attributes: int, orthonormal: bool) -> None:
    U, V, cols = layer.U, layer.V, layer.column_attribute
    for label, t in (("U", U), ("V", V)):
        if t.ndim != 2:
            raise ValueError(f"layer {name}: {label} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"layer {name}: {label} must be a float tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer {name}: {label} holds NaN or Inf")
    if U.shape[1] != V.shape[1] or U.shape[1] == 0:
        raise ValueError(
            f"layer {name}: U {tuple(U.shape)} and V {tuple(V.shape)} must share K > 0 columns"
        )
    if U.dtype != V.dtype:
        raise ValueError(f"layer {name}: U is {U.dtype} but V is {V.dtype}")
    if cols.dtype != torch.int64 or tuple(cols.shape) != (U.shape[1],):
        raise ValueError(
            f"layer {name}: column_attribute must be int64 of shape ({U.shape[1]},), got {cols.dtype} {tuple(cols.shape)}"
        )
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_attributes):
        raise ValueError(
            f"layer {name}: column_attribute indexes outside the {n_attributes} attributes"
        )
    sv = layer.singular_values
    if sv is not None and (tuple(sv.shape) != (U.shape[1],) or not bool(torch.isfinite(sv).all())):
        raise ValueError(f"layer {name}: singular_values must be finite of shape ({U.shape[1]},)")
    if orthonormal:
        tol = _ORTHONORMAL_TOL.get(U.dtype, 1e-4)
        for label, t in (("U", U), ("V", V)):
            t64 = t.double()
            err = (
                (t64.t() @ t64 - torch.eye(t.shape[1], dtype=torch.float64, device=t.device))
                .abs()
                .max()
            )
            if float(err) > tol:
                raise ValueError(
                    f"layer {name}: {label} is declared orthonormal but |{label}^T {label} - I| = {float(err):.2e} > {tol:g}"
                )


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
