"""Mine a bank from your own peft LoRAs, of any model: no base model, no rendering, no pre-training,
no cache (`attrspace.mine_peft`, `attrspace mine --loras DIR --out OUT`).

The input is checked whole first (`attrspace.mining.peft_input`: layout, readable folders, the same
layers and shapes in every LoRA), then mined (`attrspace.mining.subspaces.mine`, docs/design.md §7),
then OUT receives:

    bank.safetensors           the bank (SubspaceBank.load; inject(model, bank))
    summary.json               ranks, spectra, IRLS weights, overlaps per layer; inputs; timings
    spectra.png, overlaps.png  the spectra per layer kind and the mean overlaps per attribute pair
    report.md                  a short account of the above
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

from attrspace.mining.peft_input import LoRAInputError, LoRASet, load_lora_set, lora_folders
from attrspace.mining.subspaces import MiningConfig, MiningResult, mine
from attrspace.pipeline.cache import write_json_atomic
from attrspace.pipeline.report import figures
from attrspace.pipeline.report.tables import fmt, table
from attrspace.pipeline.stages.mining import BANK_FILE, mean_overlaps, random_reference_overlaps
from attrspace.util.files import atomic_write_bytes
from attrspace.util.folders import writable_folder

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
SPECTRA_FILE = "spectra.png"
OVERLAPS_FILE = "overlaps.png"


def prepare_out(out: Path) -> Path:
    """`out` created and writable, or LoRAInputError naming it (before any mining)."""
    return writable_folder(out, "output folder", LoRAInputError)


def mine_peft(
    loras: dict[str, list[str | os.PathLike]] | str | os.PathLike,
    out: str | os.PathLike | None = None,
    config: MiningConfig | None = None,
    *,
    layers: list[str] | None = None,
    figures_too: bool = True,
    say=None,
) -> MiningResult:
    """Mine a SubspaceBank from peft LoRA adapter folders of any model.

    loras: {attribute name: [adapter folders]} (any names), or a folder laid out as
        LORAS/<attribute>/<lora>/ (see `attrspace.mining.peft_input`).
    out: when given, the bank, summary.json, the figures (matplotlib) and report.md go there.
    config: the mining settings (`MiningConfig()` by default); layers: mine only these names.
    say: a callable for progress lines (e.g. print); None is silent.
    Everything is checked before the mining starts; a refusal is a LoRAInputError naming the folder.
    """
    say = say or (lambda _message: None)
    config = MiningConfig() if config is None else config
    if not isinstance(config, MiningConfig):
        raise TypeError(f"config must be a MiningConfig, got {type(config).__name__}")
    folders = loras if isinstance(loras, dict) else lora_folders(loras)
    if out is not None and figures_too and importlib.util.find_spec("matplotlib") is None:
        raise LoRAInputError(
            "the figures need matplotlib: pip install 'attrspace[plot]' (or figures_too=False)"
        )
    out = None if out is None else prepare_out(Path(out))
    data = load_lora_set(folders, layers)
    count = sum(len(p) for p in data.folders.values())
    say(f"mining {len(data.shapes)} layers x {len(folders)} attributes from {count} LoRAs")
    start = time.perf_counter()
    result = mine(data.updates, config)
    seconds = time.perf_counter() - start
    if out is not None:
        write_outputs(result, data, config, out, seconds, figures_too)
        say(f"bank and report written to {out}")
    return result


def mining_summary(result: MiningResult, data: LoRASet, config: MiningConfig, seconds: float):
    """summary.json's content: the mining evidence plus the inputs and the bank's sizes."""
    ranks = {name: layer.rank for name, layer in result.bank.layers.items()}
    return {
        **result.summary(),
        "attributes": list(result.bank.attributes),
        "lora_folders": {a: [str(p) for p in ps] for a, ps in data.folders.items()},
        "lora_ranks": data.ranks,
        "skipped_layers": data.skipped,
        "K": ranks,
        "shapes": {n: list(s) for n, s in data.shapes.items()},
        "trainable_params": result.bank.trainable_params(),
        "mean_overlaps": mean_overlaps(result),
        "random_overlaps": random_reference_overlaps(result, config.seed),
        "mining": {"p": config.p, "rank": str(config.rank), "rank_cap": config.rank_cap},
        "mine_seconds": seconds,
    }


def write_outputs(result, data, config, out: Path, seconds: float, figures_too: bool) -> None:
    """The bank, summary.json, the figures and report.md into `out` (each file atomically)."""
    result.bank.model_config = "mined-peft"
    result.bank.save(out / BANK_FILE)
    summary = mining_summary(result, data, config, seconds)
    write_json_atomic(out / SUMMARY_FILE, summary)
    drawn = []
    if figures_too:
        figures.spectra_by_kind_figure(summary, out / SPECTRA_FILE)
        drawn.append(SPECTRA_FILE)
        if len(summary["attributes"]) > 1:
            figures.overlap_figure(summary, out / OVERLAPS_FILE)
            drawn.append(OVERLAPS_FILE)
    text = "\n".join(report_lines(summary, drawn)) + "\n"
    atomic_write_bytes(out / REPORT_FILE, text.encode())


def report_lines(summary: dict, drawn: list[str]) -> list[str]:
    """report.md: inputs, the bank's sizes, IRLS, overlaps against random subspaces, figures."""
    K = list(summary["K"].values())
    lines = [
        "# Subspace bank mined from peft LoRAs",
        "",
        f"{len(summary['K'])} layers, {len(summary['attributes'])} attributes, IRLS p = "
        f"{summary['mining']['p']}, rank rule {summary['mining']['rank']} (cap "
        f"{summary['mining']['rank_cap']}), {summary['iterations']} iterations, "
        f"{summary['mine_seconds']:.1f} s.",
        "",
        *table(
            ["attribute", "LoRAs", "LoRA ranks", "lowest IRLS weight (mean over layers)"],
            [
                [
                    a,
                    str(len(ps)),
                    ", ".join(map(str, summary["lora_ranks"][a])),
                    _low_weight(summary, a),
                ]
                for a, ps in summary["lora_folders"].items()
            ],
        ),
        "",
        f"Bank: K per layer {min(K)} to {max(K)} (median {statistics.median(K):g}), "
        f"{fmt(summary['trainable_params'])} trainable numbers (sum of K^2) in `bank.safetensors`.",
    ]
    if summary["skipped_layers"]:
        lines.append(f"Left out (Conv2d LoRA layers): {', '.join(summary['skipped_layers'])}.")
    lines += _overlap_lines(summary)
    lines += ["", *[f"![{name}]({name})" for name in drawn]]
    lines += [
        "",
        "Use: `attrspace.inject(model, attrspace.SubspaceBank.load('bank.safetensors'))`, train M.",
    ]
    return lines


def _low_weight(summary: dict, attribute: str) -> str:
    """The smallest normalised IRLS weight of one attribute's LoRAs, averaged over the layers
    (1 / number of LoRAs when all agree; near 0 flags an outlier LoRA)."""
    lows = [min(layer["weights"][attribute]) for layer in summary["layers"].values()]
    return fmt(sum(lows) / len(lows))


def _overlap_lines(summary: dict) -> list[str]:
    if not summary["mean_overlaps"]:
        return ["", "One attribute: no overlaps to measure."]
    rows = []
    for pair, sides in summary["mean_overlaps"].items():
        ref = summary["random_overlaps"][pair]
        rows.append(
            [
                pair.replace("|", " / "),
                fmt(sides["col"]),
                fmt(ref["col"]),
                fmt(sides["row"]),
                fmt(ref["row"]),
            ]
        )
    header = ["pair", "1 - cos θ1 (U)", "random (U)", "1 - cos θ1 (V)", "random (V)"]
    return [
        "",
        "Disentanglement, mean over layers (1 = orthogonal subspaces, 0 = a shared direction); "
        "random: subspaces of the same sizes drawn at random, the reference to compare with.",
        "",
        *table(header, rows),
    ]
