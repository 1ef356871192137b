"""The mine stage: the attribute subspace bank from the LoRAs, and the control banks that keep the
downstream comparison honest. Every control has the same K per layer as the mined bank, so only the
source of the basis differs:

- psv: U, V = the top-K singular vectors of the layer's pre-trained W0 (the paper's PSV ablation);
- random: random orthonormal U, V;
- single: the consensus subspace of one attribute only, its top-K directions (fewer when that
  attribute's spectrum has fewer non-zero values; the actual K is recorded).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from attrspace.bank import LayerSubspace, SubspaceBank, random_bank
from attrspace.linalg import principal_cosines
from attrspace.mining.subspaces import MiningResult, mine, updates_from_peft
from attrspace.models.vggt.params import block_linear_names
from attrspace.pipeline.cache import clear_marker, digest, is_done, write_json_atomic, write_marker
from attrspace.pipeline.stages.common import derived_seed, lora_files_digest
from attrspace.pipeline.workspace import Workspace

BANK_FILE = "bank.safetensors"
OFFICIAL_FILE = "bank_official.safetensors"
CONTROLS = ("psv", "random", "single")
SUMMARY_VERSION = 2  # bumped when summary.json gains fields


def bank_path(out: Path, method: str) -> Path:
    """The bank file a bank method fine-tunes with."""
    if method == "subspace":
        return out / "mine" / BANK_FILE
    if method in CONTROLS:
        return out / "mine" / "controls" / f"{method}.safetensors"
    raise ValueError(f"method {method!r} uses no bank")


def psv_bank(model: torch.nn.Module, ranks: dict[str, int], scale: float) -> SubspaceBank:
    """Top-K singular vectors of each layer's W0 (d_out, d_in): U (d_out, K), V (d_in, K)."""
    layers = {}
    for name, k in ranks.items():
        w = model.get_submodule(name).weight.detach().double().cpu()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        layers[name] = LayerSubspace(
            u[:, :k].float().contiguous(),
            vh[:k].t().float().contiguous(),
            torch.zeros(k, dtype=torch.int64),
            s[:k].float(),
        )
    return SubspaceBank(layers, ("psv",), model_config="psv", scale=scale, orthonormal=True)


def matched_random_bank(
    shapes: dict[str, tuple[int, int]], ranks: dict[str, int], scale: float, seed: int
) -> SubspaceBank:
    """Random orthonormal bases with K = ranks[name] per layer (shapes: name -> (d_out, d_in))."""
    layers = {}
    for name, k in ranks.items():
        one = random_bank({name: shapes[name]}, k, scale=scale, seed=derived_seed(seed, name))
        layers[name] = one.layers[name]
    return SubspaceBank(layers, ("random",), model_config="random", scale=scale, orthonormal=True)


def single_attribute_bank(
    result: MiningResult, attribute: str, ranks: dict[str, int], scale: float
) -> SubspaceBank:
    """The leading min(K, d) consensus directions of one attribute per layer (orthonormal)."""
    layers = {}
    for name, k in ranks.items():
        u, s, v = result.bases[name][attribute]
        k = min(k, u.shape[1])
        layers[name] = LayerSubspace(
            u[:, :k].float().contiguous(),
            v[:, :k].float().contiguous(),
            torch.zeros(k, dtype=torch.int64),
            s[:k].float(),
        )
    return SubspaceBank(layers, (attribute,), model_config="single", scale=scale, orthonormal=True)


def mean_overlaps(result: MiningResult) -> dict[str, dict[str, float]]:
    """Per attribute pair, 1 - cos(theta_1) averaged over layers, for column and row spaces."""
    pairs: dict[str, dict[str, list[float]]] = {}
    for per_pair in result.overlaps.values():
        for pair, values in per_pair.items():
            entry = pairs.setdefault(pair, {"col": [], "row": []})
            entry["col"].append(values["col_score"])
            entry["row"].append(values["row_score"])
    return {
        pair: {side: sum(v) / len(v) for side, v in sides.items()} for pair, sides in pairs.items()
    }


def random_reference_overlaps(
    result: MiningResult, seed: int, draws: int = 16
) -> dict[str, dict[str, float]]:
    """The same score for random subspaces of the same sizes: per attribute pair, 1 - cos(theta_1)
    between random d_a- and d_b-dimensional subspaces of R^d_out (col) and R^d_in (row), averaged
    over `draws` draws and the layers. What "near-orthogonal" should be compared with: in a
    low-dimensional layer even unrelated subspaces come close."""
    generator = torch.Generator().manual_seed(seed)
    pairs: dict[str, dict[str, list[float]]] = {}
    for name, per_pair in result.overlaps.items():
        for pair in per_pair:
            a, b = pair.split("|")
            (ua, _, va), (ub, _, vb) = result.bases[name][a], result.bases[name][b]
            entry = pairs.setdefault(pair, {"col": [], "row": []})
            for side, rows, da, db in (
                ("col", ua.shape[0], ua.shape[1], ub.shape[1]),
                ("row", va.shape[0], va.shape[1], vb.shape[1]),
            ):
                x = torch.randn(draws, rows, da, generator=generator, dtype=torch.float64)
                y = torch.randn(draws, rows, db, generator=generator, dtype=torch.float64)
                cos = principal_cosines(x, y)[:, 0]
                entry[side].append(float((1 - cos).mean()))
    return {
        pair: {side: sum(v) / len(v) for side, v in sides.items()} for pair, sides in pairs.items()
    }


def mine_digest(ws: Workspace, base: str, lora_folders: dict[str, list[Path]]) -> str:
    """Everything that shapes the mine stage's banks."""
    preset = ws.preset
    return digest(
        "mine",
        SUMMARY_VERSION,
        base,
        lora_files_digest(lora_folders),
        preset.mining,
        preset.single_attribute,
        preset.seed,  # the random control bank's seed derives from it
    )


def mine_stage(ws: Workspace, base: str, lora_folders: dict[str, list[Path]]) -> str:
    """Mine OUT/mine/bank.safetensors (+ the official layout and summary.json) and the control banks
    under OUT/mine/controls/. Returns the mine digest (it covers every bank written)."""
    preset = ws.preset
    folder = ws.out / "mine"
    expected = mine_digest(ws, base, lora_folders)
    if is_done(folder, expected):
        ws.record("mine", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    model = ws.load_base(base)
    layers = block_linear_names(model)
    ws.say(f"mining {len(layers)} layers x {len(lora_folders)} attributes")
    updates = updates_from_peft({a: list(f) for a, f in lora_folders.items()}, layers)
    result = mine(updates, preset.mining)
    mine_seconds = time.perf_counter() - start
    bank = result.bank
    bank.model_config = f"attrspace-{preset.name}"
    bank.save(folder / BANK_FILE)
    bank.save_official(folder / OFFICIAL_FILE)
    ranks = {name: layer.rank for name, layer in bank.layers.items()}
    shapes = {name: (layer.d_out, layer.d_in) for name, layer in bank.layers.items()}
    scale = bank.scale
    controls = {
        "psv": psv_bank(model, ranks, scale),
        "random": matched_random_bank(shapes, ranks, scale, preset.seed),
    }
    single = preset.single_attribute
    if single in lora_folders:
        alone = mine(
            {single: updates[single]},
            replace(
                preset.mining,
                rank=max(ranks.values()),
                spectrum=max(preset.mining.spectrum, max(ranks.values())),
            ),
        )
        controls["single"] = single_attribute_bank(alone, single, ranks, scale)
    for name, control in controls.items():
        control.save(bank_path(ws.out, name))
    summary = {
        **result.summary(),
        "attributes": list(bank.attributes),
        "lora_folders": {a: [str(p) for p in f] for a, f in lora_folders.items()},
        "K": ranks,
        "shapes": shapes,
        "trainable_params": bank.trainable_params(),
        "control_K": {n: {k: v.rank for k, v in c.layers.items()} for n, c in controls.items()},
        "single_attribute": single if "single" in controls else None,
        "mean_overlaps": mean_overlaps(result),
        "random_overlaps": random_reference_overlaps(result, preset.seed),
        "mine_seconds": mine_seconds,
    }
    write_json_atomic(folder / "summary.json", summary)
    write_marker(folder, "mine", expected, time.perf_counter() - start, layers=len(layers))
    ws.record("mine", "ran")
    return expected
