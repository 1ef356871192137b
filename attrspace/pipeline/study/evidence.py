"""The study's statistics on the LoRAs, banks and base (OUT/study/stats/set<s>/stats.json, one
cache unit per LoRA set):

- G1: per LoRA and block linear, how far A moved from its init and how much of the update the
  init's row space explains;
- specificity: cosine similarity of the updates within vs between attributes with a permutation
  p-value, over all pairs and over the pairs that share no content stream (data/families.py);
- held-out capture: the share of each LoRA's update captured by its own attribute's subspace
  (mined without it) and by the others';
- overlap references beside the random one: 1 - cos(theta_1) between attributes, between the two
  halves of one attribute's LoRAs (split-half: what "the same attribute" looks like) and between
  shuffled groups (what groups without attribute structure look like);
- G0 (set 0 only): how much a random perturbation of every block linear moves the predictions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from attrspace.adapters.inject import inject_lora
from attrspace.export.peft_folder import load_peft, lora_state
from attrspace.mining.subspaces import mine, updates_from_peft
from attrspace.models.vggt.params import adaptation_targets, block_linear_names
from attrspace.pipeline.cache import clear_marker, digest, is_done, write_json_atomic, write_marker
from attrspace.pipeline.stages.common import derived_seed, lora_files_digest
from attrspace.pipeline.study import stats as st
from attrspace.pipeline.study.banks import flat, lora_seed, shuffled_groups
from attrspace.pipeline.workspace import Workspace

STATS_FILE = "stats.json"


def initial_A(
    ws: Workspace, base: str, attribute: str, name: str, lora_set: int
) -> dict[str, torch.Tensor]:
    """A of every LoRA layer right after injection, as its stage initialised it (same seed, same
    targets, same order)."""
    preset = ws.preset
    model = ws.load_base(base)
    torch.manual_seed(lora_seed(ws, attribute, name, lora_set))
    inject_lora(
        model, adaptation_targets(model, "paper-lora").lora, preset.lora_rank, preset.lora_alpha
    )
    return {k: f.A.detach().cpu() for k, f in lora_state(model).items()}


def movement_gates(ws, base, folders, layers, factors, lora_set) -> tuple[dict, dict]:
    """Per attribute: every (LoRA, layer) movement and the medians G1 looks at."""
    labels, paths = flat(folders)
    moved: dict[str, dict[str, list[float]]] = {}
    for a, p, f in zip(labels, paths, factors, strict=True):
        a0 = initial_A(ws, base, a, p.name, lora_set)
        entry = moved.setdefault(a, {"rel_change": [], "init_energy": []})
        for name in layers:
            m = st.lora_movement(f[name].A, a0[name], f[name].B)
            entry["rel_change"].append(m["rel_change"])
            entry["init_energy"].append(m["init_energy"])
    gates = {
        a: {
            "median_rel_change": st.median(v["rel_change"]),
            "median_init_energy": st.median(v["init_energy"]),
        }
        for a, v in moved.items()
    }
    return gates, moved


def content_mask(folders: dict[str, list[Path]], streams: int) -> np.ndarray | None:
    """Pairs of LoRAs that share no content stream (dataset index mod streams; the folders of an
    attribute are in dataset order), or None when every dataset of a family shares one stream."""
    if streams == 1:
        return None
    index = np.array([i % streams for a in sorted(folders) for i in range(len(folders[a]))])
    return index[:, None] != index[None, :]


def _capture_row(updates, folders, layers, full, a, i, generator) -> dict:
    rest = {n: [u for j, u in enumerate(updates[a][n]) if j != i] for n in layers}
    if not all(rest.values()):
        raise ValueError(f"attribute {a!r}: held-out capture needs >= 2 LoRAs")
    loo = mine({a: rest}, full.config)
    row = {"lora": folders[a][i].name, "attribute": a, "capture": {}}
    for b in sorted(folders):
        source = loo if b == a else full.result
        values = [st.capture(updates[a][n][i], *source.bases[n][b][0::2]) for n in layers]
        row["capture"][b] = float(np.mean(values))
    randoms = []
    for n in layers:
        u, _, v = loo.bases[n][a]
        ru = st.random_orthonormal(u.shape[0], u.shape[1], generator)
        rv = st.random_orthonormal(v.shape[0], v.shape[1], generator)
        randoms.append(st.capture(updates[a][n][i], ru, rv))
    row["random"] = float(np.mean(randoms))
    return row


class _Mined:
    def __init__(self, result, config) -> None:
        self.result, self.config = result, config


def held_out_capture(ws, folders, layers, updates, full) -> list[dict]:
    """Every LoRA against its attribute mined without it and the others mined whole."""
    generator = torch.Generator().manual_seed(derived_seed(ws.preset.seed, "study", "capture"))
    mined = _Mined(full, ws.preset.mining)
    return [
        _capture_row(updates, folders, layers, mined, a, i, generator)
        for a in sorted(folders)
        for i in range(len(folders[a]))
    ]


def overlap_references(ws, folders, layers, updates, full) -> dict:
    """1 - cos(theta_1) (columns, rows) between attributes, between halves of one attribute, and
    between shuffled groups; the mining settings of the bank."""
    halves = {}
    for a in sorted(folders):
        n = len(folders[a])
        for h, part in enumerate((range(0, n // 2), range(n // 2, n))):
            halves[f"{a}:h{h}"] = {k: [updates[a][k][i] for i in part] for k in layers}
    split = mine(halves, ws.preset.mining)
    pairs = [(f"{a}:h0", f"{a}:h1") for a in sorted(folders)]
    labels, paths = flat(folders)
    shuffle = shuffled_groups(labels, derived_seed(ws.preset.seed, "study", "overlap-shuffle"))
    groups: dict[str, list[Path]] = {}
    for g, p in zip(shuffle, paths, strict=True):
        groups.setdefault(g, []).append(p)
    shuffled = mine(updates_from_peft(groups, layers), ws.preset.mining)
    return {
        "attributes": st.mean_pair_overlap(full),
        "split_half": st.mean_pair_overlap(split, pairs),
        "shuffled_groups": st.mean_pair_overlap(shuffled),
    }


@torch.no_grad()
def perturbation(ws: Workspace, base: str, scenes: list[dict], relative: float) -> dict:
    """Mean relative change of the predicted depth (|d' - d| / d over pixels) and of the final pose
    encoding (||p' - p|| / ||p||) when every block linear's W gets Gaussian noise of Frobenius
    norm relative * ||W||."""
    model, moved = ws.load_base(base), ws.load_base(base)
    generator = torch.Generator().manual_seed(derived_seed(ws.preset.seed, "study", "perturb"))
    for name in block_linear_names(moved):
        w = moved.get_submodule(name).weight
        noise = torch.randn(w.shape, generator=generator).to(w)
        w += relative * w.norm() / noise.norm() * noise
    depth, pose = [], []
    model.eval(), moved.eval()
    for scene in scenes:
        images = scene["images"][None].to(ws.device)
        p, q = model(images), moved(images)
        depth.append(float(((q["depth"] - p["depth"]).abs() / p["depth"].abs()).mean()))
        pose.append(float((q["pose_enc"] - p["pose_enc"]).norm() / p["pose_enc"].norm()))
    return {
        "relative": relative,
        "depth_change": float(np.mean(depth)),
        "pose_change": float(np.mean(pose)),
    }


def stats_stage(
    ws: Workspace, base: str, folders: dict[str, list[Path]], lora_set: int, val_scenes
) -> str:
    """OUT/study/stats/set<lora_set>/stats.json (see the module doc); returns its digest."""
    preset, study = ws.preset, ws.preset.study
    folder = ws.out / "study" / "stats" / f"set{lora_set}"
    expected = digest(
        "study-stats",
        base,
        lora_files_digest(folders),
        preset.mining,
        preset.lora_rank,
        preset.lora_alpha,
        study,
        preset.seed,
        preset.data.content_streams,
        lora_set,
    )
    if is_done(folder, expected):
        ws.record(f"study/stats/set{lora_set}", "cached")
        return expected
    clear_marker(folder)
    start = time.perf_counter()
    layers = block_linear_names(ws.load_base(base))
    labels, paths = flat(folders)
    factors = [load_peft(p) for p in paths]
    if not factors or any(set(layers) - set(f) for f in factors):
        raise ValueError(f"{paths[0].parent.parent}: some LoRA lacks a block linear")
    gates, moved = movement_gates(ws, base, folders, layers, factors, lora_set)
    sim = st.similarity_matrix([{n: f[n].left_right() for n in layers} for f in factors], layers)
    seed = derived_seed(preset.seed, "study", "perm")
    mask = content_mask(folders, preset.data.content_streams)
    updates = updates_from_peft(folders, layers)
    full = mine(updates, preset.mining)
    held = held_out_capture(ws, folders, layers, updates, full)
    stats = {
        "layers": layers,
        "labels": labels,
        "loras": [p.name for p in paths],
        "gates": gates,
        "movement": moved,
        "similarity": sim.tolist(),
        "specificity": st.specificity_test(sim, labels, study.permutations, seed),
        "specificity_no_shared_content": (
            None
            if mask is None
            else st.specificity_test(sim, labels, study.permutations, seed, mask)
        ),
        "held_out": held,
        "own_capture_wins": float(np.mean([_wins(r) for r in held])),
        "overlaps": overlap_references(ws, folders, layers, updates, full),
    }
    if lora_set == 0:
        stats["perturbation"] = perturbation(ws, base, val_scenes, study.perturbation)
    write_json_atomic(folder / STATS_FILE, stats)
    write_marker(folder, "study-stats", expected, time.perf_counter() - start)
    ws.record(f"study/stats/set{lora_set}", "ran")
    return expected


def _wins(row: dict) -> bool:
    own = row["capture"][row["attribute"]]
    return own > max(v for b, v in row["capture"].items() if b != row["attribute"])
