"""Checks behind SubspaceBank and its files: types, ranges, shapes, orthonormality, devices.

Each raises TypeError or ValueError with a message that names the field; attrspace.bank adds the
file path and layer name.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attrspace.util.checks import positive_finite, positive_int, usable_device

if TYPE_CHECKING:
    from attrspace.bank import LayerSubspace

HEADER_FIELDS = ("schema_version", "model_config", "attributes", "scale", "orthonormal", "extra")
LAYER_FIELDS = ("d_in", "d_out", "K")
ORTHONORMAL_TOL = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def target_device(device) -> torch.device:
    if str(device).startswith("meta"):
        raise ValueError(
            "device='meta' holds no data, so a bank cannot be checked or used there; load it on 'cpu'"
        )
    return usable_device(device)


def check_header(header: dict) -> None:
    """Every header field present, none unknown, each of the right type and range."""
    expected = (*HEADER_FIELDS, "layers")
    missing = [k for k in expected if k not in header]
    unknown = sorted(set(header) - set(expected))
    if missing or unknown:
        parts = ([f"missing key(s) {missing}"] if missing else []) + (
            [f"unknown key(s) {unknown}"] if unknown else []
        )
        raise ValueError(" and ".join(parts))
    if not isinstance(header["attributes"], list):
        raise TypeError(f"attributes must be a list of str, got {header['attributes']!r}")
    check_attributes(header["attributes"])
    if not isinstance(header["model_config"], str):
        raise TypeError(f"model_config must be a str, got {header['model_config']!r}")
    positive_finite("scale", header["scale"])
    if not isinstance(header["orthonormal"], bool):
        raise TypeError(f"orthonormal must be true or false, got {header['orthonormal']!r}")
    check_extra(header["extra"])
    layers = header["layers"]
    if not isinstance(layers, dict) or not layers:
        raise TypeError(f"layers must be a non-empty object, got {layers!r}")
    for name, dims in layers.items():
        if not isinstance(dims, dict) or sorted(dims) != sorted(LAYER_FIELDS):
            raise TypeError(f"layer {name}: needs exactly {list(LAYER_FIELDS)}, got {dims!r}")
        for key in LAYER_FIELDS:
            positive_int(key, dims[key], f"layer {name}")


def check_attributes(attributes) -> None:
    if not attributes:
        raise ValueError("attributes must name at least one attribute")
    for a in attributes:
        if not isinstance(a, str) or not a:
            raise TypeError(f"attributes must be non-empty str, got {a!r}")
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes must be distinct, got {list(attributes)}")


def check_extra(extra) -> None:
    """extra must survive the JSON round trip unchanged (str keys, no tuples, no NaN)."""
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        same = json.loads(json.dumps(extra, allow_nan=False)) == extra
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-compatible: {exc}") from exc
    if not same:
        raise TypeError(
            f"extra must be JSON-compatible (str keys, lists not tuples), got {extra!r}"
        )


def check_tensors(layer: LayerSubspace) -> None:
    U, V, cols = layer.U, layer.V, layer.column_attribute
    for label, t in (("U", U), ("V", V), ("column_attribute", cols)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a Tensor, got {type(t).__name__}")
    for label, t in (("U", U), ("V", V)):
        if t.ndim != 2:
            raise ValueError(f"{label} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{label} must be a float tensor, got {t.dtype}")
        if t.device.type == "meta":
            raise ValueError(f"{label} is on the meta device (no data)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label} holds NaN or Inf")
    if U.shape[1] != V.shape[1] or U.shape[1] == 0:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} must share K > 0 columns")
    if U.dtype != V.dtype:
        raise ValueError(f"U is {U.dtype} but V is {V.dtype}")
    if U.device != V.device or cols.device != U.device:
        raise ValueError(f"U, V and column_attribute must share a device ({U.device}, {V.device})")
    if cols.dtype != torch.int64 or tuple(cols.shape) != (U.shape[1],):
        raise ValueError(
            f"column_attribute must be int64 of shape ({U.shape[1]},), got {cols.dtype} "
            f"{tuple(cols.shape)}"
        )
    if int(cols.min()) < 0:
        raise ValueError("column_attribute holds a negative index")
    sv = layer.singular_values
    if sv is not None and (
        not isinstance(sv, Tensor)
        or not sv.is_floating_point()
        or tuple(sv.shape) != (U.shape[1],)
        or not bool(torch.isfinite(sv).all())
    ):
        raise ValueError(f"singular_values must be finite floats of shape ({U.shape[1]},)")


def check_against_bank(
    name: str, layer: LayerSubspace, n_attributes: int, orthonormal: bool
) -> None:
    cols = layer.column_attribute
    if int(cols.max()) >= n_attributes:
        raise ValueError(
            f"layer {name}: column_attribute indexes outside the {n_attributes} attributes"
        )
    if orthonormal:
        tol = ORTHONORMAL_TOL.get(layer.U.dtype, 1e-4)
        for label, t in (("U", layer.U), ("V", layer.V)):
            t64 = t.double()
            eye = torch.eye(t.shape[1], dtype=torch.float64, device=t.device)
            err = float((t64.t() @ t64 - eye).abs().max())
            if err > tol:
                raise ValueError(
                    f"layer {name}: {label} is declared orthonormal but "
                    f"|{label}^T {label} - I| = {err:.2e} > {tol:g}"
                )
