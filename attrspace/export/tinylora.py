"""SubspaceLinear layers in peft's TinyLoRA layout (peft >= 0.19; written against peft 0.21.2), so
that plain peft continues training exactly M.

peft's TinyLoRA layer computes y = base(x) + B R A x with frozen buffers A (r, d_in), B (d_out, r),
P (u, r, r) and a trainable vector v (u,), R = sum_i v_i P_i. With r = K, u = K^2, A = V^T, B = s U,
P_i = the unit matrix E_(i // K, i % K) and v = vec(M) (row-major), R = M and the update is exactly
s U M V^T; peft's v is M itself, so training v trains M and nothing else.

The cost is K^4 per layer: P holds K^4 numbers (K = 16: 64 Ki numbers, 256 KiB in fp32, 48 MiB over
VGGT's 192 block linears; K = 32: 4 MiB per layer, 768 MiB) and every forward forms R with K^4
multiply-adds, to produce K^2 numbers. So K above MAX_K (32) is refused: the projections would
weigh as much as a large share of the model, for a parametrisation that a K x K matrix gives free.

Constraints of the layout: one r and one u per adapter, so every SubspaceLinear must have the same K;
TinyLoRA holds no LoRA layers (export those with format="lora"); v is indexed by the model's module
order, which the folder alone does not record, so attrspace writes that order into the safetensors
metadata (`TINYLORA_ORDER_KEY`) to read its own folders back.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from attrspace.export.peft_folder import TINYLORA_ORDER_KEY, target_modules

MAX_K = 32
_PREFIX = "base_model.model."


def unit_projections(K: int) -> Tensor:
    """P (K^2, K, K) with P[i] = E_(i // K, i % K): sum_i v_i P_i = v.reshape(K, K)."""
    return torch.eye(K * K, dtype=torch.float32).reshape(K * K, K, K)


def check_ranks(ranks: dict[str, int]) -> int:
    """The common K of the subspace layers, or ValueError saying why TinyLoRA cannot hold them."""
    if not ranks:
        raise ValueError("format='tinylora' writes SubspaceLinear layers; the model has none")
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        example = {k: next(n for n, r in ranks.items() if r == k) for k in distinct[:3]}
        raise ValueError(
            f"TinyLoRA has one r per adapter, the layers have K {distinct} (e.g. {example}); "
            "use format='lora'"
        )
    K = distinct[0]
    if K > MAX_K:
        raise ValueError(
            f"K = {K} > {MAX_K}: TinyLoRA's projections P hold K^4 = {K**4:,} numbers per layer "
            f"({4 * K**4 / 2**20:.0f} MiB in fp32) and each forward spends K^4 multiply-adds to form "
            "a K x K matrix; use format='lora' (or save M itself)"
        )
    return K


def tinylora_tensors(layers: dict[str, tuple[Tensor, Tensor, Tensor, float]]) -> dict[str, Tensor]:
    """peft's TinyLoRA keys for {name: (U, V, M, scale)} given in the model's module order."""
    K = check_ranks({name: M.shape[0] for name, (_, _, M, _) in layers.items()})
    P = unit_projections(K)
    tensors = {}
    for index, (name, (U, V, M, scale)) in enumerate(layers.items()):
        acc = torch.float64 if M.dtype == torch.float64 else torch.float32
        tensors[f"{_PREFIX}{name}.tinylora_A"] = V.to(acc).t().contiguous()
        tensors[f"{_PREFIX}{name}.tinylora_B"] = (scale * U.to(acc)).contiguous()
        tensors[f"{_PREFIX}{name}.tinylora_P"] = P.to(acc).clone()
        tensors[f"base_model.tinylora_v.{index}"] = M.to(acc).reshape(-1).clone()
    return tensors


def tinylora_config(
    names: list[str],
    K: int,
    base_model_name_or_path: str | None,
    module_names: list[str],
    modules_to_save: list[str] | None,
) -> dict:
    """adapter_config.json of a TinyLoRA adapter over `names` (r = K, u = K^2, P saved)."""
    return {
        "peft_type": "TINYLORA",
        "r": K,
        "u": K * K,
        "weight_tying": 0.0,
        "projection_seed": 42,
        "save_projection": True,
        "init_v_bound": 0.02,
        "target_modules": target_modules(names, module_names),
        "tinylora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
    }


def order_metadata(names: list[str]) -> dict[str, str]:
    return {TINYLORA_ORDER_KEY: json.dumps(list(names))}
