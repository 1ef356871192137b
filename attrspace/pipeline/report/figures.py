"""The report's figures (matplotlib, imported only here and only when a report is written)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from attrspace.util.files import atomic_write_bytes

BLOCK_KINDS = ("frame", "global")
LAYER_KINDS = ("qkv", "proj", "fc1", "fc2")


def layer_kind(name: str) -> tuple[str, str, int]:
    """ "aggregator.frame_blocks.3.attn.qkv" -> ("frame", "qkv", 3)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("frame_blocks", "global_blocks"):
            return part.split("_")[0], parts[-1], int(parts[i + 1])
    raise ValueError(f"{name!r} is not a block linear of the aggregator")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """PNG bytes drawn in memory, then written whole (temp file + os.replace)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _plot_spectra(ax, layer: dict, colors: dict) -> None:
    """One layer's spectra on `ax`, one line per attribute normalised by its largest value, a dot
    at the chosen rank d."""
    for a, values in layer["spectra"].items():
        top = max(values[0], 1e-30)
        normed = [max(v / top, 1e-8) for v in values]
        ax.semilogy(range(1, len(normed) + 1), normed, color=colors[a], lw=0.8, alpha=0.7)
        d = layer["ranks"][a]
        ax.plot([d], [normed[d - 1]], "o", color=colors[a], ms=3)


def spectra_figure(summary: dict, path: Path) -> Path:
    """Singular values of each attribute's consensus C per layer (normalised by the largest),
    one panel per layer kind (frame/global x qkv/proj/fc1/fc2), one line per block; the dot marks
    the chosen rank d."""
    plt = _pyplot()
    attributes = summary["attributes"]
    colors = dict(zip(attributes, _colors(len(attributes)), strict=False))
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharey=True)
    for name, layer in summary["layers"].items():
        block, kind, _ = layer_kind(name)
        ax = axes[BLOCK_KINDS.index(block)][LAYER_KINDS.index(kind)]
        _plot_spectra(ax, layer, colors)
    for i, block in enumerate(BLOCK_KINDS):
        for j, kind in enumerate(LAYER_KINDS):
            ax = axes[i][j]
            ax.set_title(f"{block} {kind}", fontsize=9)
            ax.grid(True, which="both", lw=0.3)
            if i == 1:
                ax.set_xlabel("index")
            if j == 0:
                ax.set_ylabel("s_i / s_1")
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in attributes]
    fig.legend(handles=handles, loc="upper center", ncol=len(attributes), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save(fig, path)
    plt.close(fig)
    return path


def layer_group(name: str) -> tuple[str, str]:
    """("blocks.*.attn.qkv", "3") for "blocks.3.attn.qkv": a layer's kind (its name with the first
    number replaced) and its index; ("head", "") for a name without a number."""
    match = re.search(r"(^|\.)(\d+)(\.|$)", name)
    if match is None:
        return name, ""
    return name[: match.start(2)] + "*" + name[match.end(2) :], match.group(2)


def spectra_by_kind_figure(summary: dict, path: Path, columns: int = 4) -> Path:
    """Spectra of any model's layers: one panel per layer kind (`layer_group`), one line per layer
    and attribute (normalised by its largest value); the dot marks the chosen rank d."""
    plt = _pyplot()
    attributes = summary["attributes"]
    colors = dict(zip(attributes, _colors(len(attributes)), strict=False))
    kinds = sorted({layer_group(name)[0] for name in summary["layers"]})
    rows = -(-len(kinds) // columns)
    width = min(columns, len(kinds))
    fig, axes = plt.subplots(
        rows, width, figsize=(3.5 * width, 3.0 * rows + 0.6), sharey=True, squeeze=False
    )
    for name, layer in summary["layers"].items():
        index = kinds.index(layer_group(name)[0])
        ax = axes[index // width][index % width]
        _plot_spectra(ax, layer, colors)
    for index, ax in enumerate(axes.flat):
        if index >= len(kinds):
            ax.set_visible(False)
            continue
        ax.set_title(kinds[index], fontsize=8)
        ax.grid(True, which="both", lw=0.3)
        ax.set_xlabel("index", fontsize=8)
    for row in axes:
        row[0].set_ylabel("s_i / s_1")
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in attributes]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(attributes), 6), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.0 * rows + 0.6)))
    _save(fig, path)
    plt.close(fig)
    return path


def overlap_figure(summary: dict, path: Path) -> Path:
    """Mean over layers of 1 - cos(theta_1) for every attribute pair, column and row spaces."""
    plt = _pyplot()
    import numpy as np

    attributes = summary["attributes"]
    n = len(attributes)
    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2, 3.8))
    for ax, side, title in zip(
        axes, ("col", "row"), ("column spaces (U)", "row spaces (V)"), strict=False
    ):
        grid = np.full((n, n), np.nan)
        for pair, sides in summary["mean_overlaps"].items():
            a, b = pair.split("|")
            i, j = attributes.index(a), attributes.index(b)
            grid[i, j] = grid[j, i] = sides[side]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(n):
            for j in range(n):
                if not np.isnan(grid[i, j]):
                    ax.text(
                        j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w"
                    )
        ax.set_xticks(range(n), attributes, rotation=30, fontsize=8)
        ax.set_yticks(range(n), attributes, fontsize=8)
        ax.set_title(f"1 - cos θ1, {title}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _smooth(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def curves_figure(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Training objectives (moving average over 5% of the steps): one panel per group (pre-training,
    LoRAs per attribute, each task's methods)."""
    plt = _pyplot()
    groups = [g for g, lines in curves.items() if lines]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        lines = curves[group]
        for (label, values), color in zip(lines.items(), _colors(len(lines)), strict=False):
            width = max(1, len(values) // 20)
            ax.plot(_smooth(values, width), label=label, color=color, lw=1)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, lw=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training objective")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def study_figure(comparisons: list[dict], similarity: list[list[float]], labels: list[str], path):
    """Left: each arm's paired test-error difference to the mined bank-only arm with 2 s.e. bars
    (below zero: the arm is better). Right: cosine similarity of the attribute LoRAs' updates,
    LoRAs grouped by attribute."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [c["arm"] for c in comparisons]
    diffs = [c["diff"] for c in comparisons]
    bars = [2 * c["se"] for c in comparisons]
    ys = range(len(names))
    left.errorbar(diffs, ys, xerr=bars, fmt="o", color="black", capsize=3)
    left.axvline(0.0, color="grey", lw=0.8)
    left.set_yticks(list(ys), names)
    left.invert_yaxis()
    left.set_xlabel("test error: arm − bank:mined (± 2 s.e.)")
    left.set_title("fine-tuning arms against the mined bank")
    import numpy as np

    sim = np.array(similarity, dtype=float)
    np.fill_diagonal(sim, np.nan)  # self-similarity (1) would wash out the colour scale
    top = float(np.nanmax(np.abs(sim))) if sim.size > 1 else 1.0
    image = right.imshow(sim, cmap="RdBu_r", vmin=-top, vmax=top)
    fig.colorbar(image, ax=right, fraction=0.046)
    edges = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    for e in edges:
        right.axhline(e - 0.5, color="black", lw=0.6)
        right.axvline(e - 0.5, color="black", lw=0.6)
    starts = [0, *edges]
    ends = [*edges, len(labels)]
    centres = [(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)]
    right.set_xticks(centres, [labels[s] for s in starts], rotation=30)
    right.set_yticks(centres, [labels[s] for s in starts])
    right.set_title("update similarity between LoRAs (diagonal blank)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
