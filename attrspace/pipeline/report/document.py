"""OUT/report.md (+ OUT/figures/): everything a run measured, read back from the stage outputs.

Nothing in the report is typed in by hand: every number comes from a file a stage wrote (markers,
curves, the mining summary, the fine-tuning metrics, runs.json)."""

from __future__ import annotations

import statistics
from pathlib import Path

from attrspace.pipeline.cache import StageFileError
from attrspace.pipeline.presets import METHOD_TITLES
from attrspace.pipeline.report import figures
from attrspace.pipeline.report.figures import BLOCK_KINDS, LAYER_KINDS, layer_kind
from attrspace.pipeline.report.results import collect, paired_difference
from attrspace.pipeline.report.tables import fmt, table
from attrspace.pipeline.stages.evaluate import HEADLINE
from attrspace.pipeline.study.report import study_section
from attrspace.util.files import atomic_write_bytes


def _machine_section(info: dict) -> list[str]:
    if not info["runs"]:
        return ["No run record (runs.json) was found."]
    last = info["runs"][-1]
    m = last["machine"]
    lines = [
        f"- Preset **{last['preset']}**, device `{last['device']}`; {m['cpu']}, {m['cpu_count']} "
        f"logical CPUs, torch {m['torch']} (threads: {last.get('threads', m['torch_threads'])}), "
        f"Python {m['python']}" + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"- Last invocation (`{last['command']}`, started {last['started']}): "
        f"**{last['wall_seconds']:.1f} s** wall, {len(last['ran'])} pieces of work done, "
        f"{len(last['cached'])} taken from the cache; load average (1/5/15 min) before "
        f"{last['load_before']}, after {last['load_after']}.",
    ]
    if len(info["runs"]) > 1:
        total = sum(r["wall_seconds"] for r in info["runs"])
        lines.append(f"- {len(info['runs'])} invocations in this folder, {total:.1f} s in all.")
    return lines


def _stage_times(info: dict) -> list[str]:
    rows = []
    for family, marker in info["data"].items():
        rows.append(
            [f"render {family}", f"{marker['seconds']:.1f}", f"{marker.get('scenes', '')} scenes"]
        )
    if "base" in info:
        b = info["base"]
        rows.append(
            ["pre-train base", f"{b['seconds']:.1f}", f"{b.get('steps', 'checkpoint')} steps"]
        )
    for attribute, loras in info["loras"].items():
        seconds = sum(x["marker"]["seconds"] for x in loras.values())
        rows.append([f"LoRAs {attribute}", f"{seconds:.1f}", f"{len(loras)} LoRAs"])
    if "mine_marker" in info:
        rows.append(
            [
                "mine + control banks",
                f"{info['mine_marker']['seconds']:.1f}",
                f"IRLS {info['mine']['iterations']} iterations, mining alone "
                f"{info['mine']['mine_seconds']:.1f} s",
            ]
        )
    for task, methods in info["finetune"].items():
        seconds = sum(r["seconds"] for r in methods.values())
        rows.append(
            [f"fine-tune {task}", f"{seconds:.1f}", f"{len(methods)} methods incl. evaluation"]
        )
    total = sum(float(r[1]) for r in rows)
    rows.append(
        ["**sum of stages**", f"**{total:.1f}**", "as first computed (cached work counts once)"]
    )
    return table(["stage", "seconds", "what"], rows)


def _lora_section(info: dict) -> list[str]:
    rows = []
    for attribute, loras in info["loras"].items():
        finals = [
            statistics.fmean(x["objective"][-max(1, len(x["objective"]) // 10) :])
            for x in loras.values()
        ]
        firsts = [x["objective"][0] for x in loras.values()]
        step = statistics.median(x["step_ms"] for x in loras.values())
        rows.append(
            [
                attribute,
                str(len(loras)),
                fmt(statistics.fmean(firsts)),
                fmt(statistics.fmean(finals)),
                fmt(step, 1),
                fmt(next(iter(loras.values()))["trainable_params"]),
            ]
        )
    return table(
        [
            "attribute",
            "LoRAs",
            "objective, first step",
            "objective, last 10%",
            "step ms (median)",
            "trainable params",
        ],
        rows,
    )


def _rank_rows(mine: dict) -> list[list[str]]:
    """Per (block, layer kind): each attribute's rank d (mean, min-max) and the bank's mean K."""
    attributes = mine["attributes"]
    by_kind: dict[tuple[str, str], dict[str, list[int]]] = {}
    for name, layer in mine["layers"].items():
        block, kind, _ = layer_kind(name)
        for a in attributes:
            by_kind.setdefault((block, kind), {}).setdefault(a, []).append(layer["ranks"][a])
    rows = []
    for block in BLOCK_KINDS:
        for kind in LAYER_KINDS:
            if (block, kind) not in by_kind:
                continue
            ranks = by_kind[(block, kind)]
            ks = [mine["K"][n] for n in mine["layers"] if layer_kind(n)[:2] == (block, kind)]
            cells = [
                f"{statistics.fmean(ranks[a]):.1f} ({min(ranks[a])}-{max(ranks[a])})"
                for a in attributes
            ]
            rows.append([f"{block} {kind}", *cells, f"{statistics.fmean(ks):.1f}"])
    return rows


def _overlap_lines(mine: dict) -> list[str]:
    """The disentanglement table (1 - cos θ1 per attribute pair, beside the random reference)."""
    scores = [
        (pair, s["col_score"], s["row_score"])
        for layer in mine["layers"].values()
        for pair, s in layer["overlaps"].items()
    ]
    if not scores:
        return []
    reference = mine.get("random_overlaps", {})

    def ref(pair: str, side: str) -> str:
        return f"{reference[pair][side]:.3f}" if pair in reference else "–"

    rows = [
        [
            pair.replace("|", " / "),
            f"{v['col']:.3f}",
            ref(pair, "col"),
            f"{v['row']:.3f}",
            ref(pair, "row"),
            f"{min(s[1] for s in scores if s[0] == pair):.3f}",
        ]
        for pair, v in mine["mean_overlaps"].items()
    ]
    lines = [
        "",
        "Disentanglement, 1 - cos θ1 (1 = orthogonal, 0 = a shared direction), mean over "
        "layers; the random reference is the same score for random subspaces of the same sizes "
        "(16 draws per layer):",
        "",
    ]
    header = ["attribute pair", "columns (U)", "random ref.", "rows (V)", "random ref."]
    lines += [*table([*header, "min over layers (U)"], rows), ""]
    for side, key, index in (("column", "col", 1), ("row", "row", 2)):
        values = [x[index] for x in scores]
        above = sum(v > 0.5 for v in values) / len(values)
        text = (
            f"- {side} spaces: mean {statistics.fmean(values):.3f}, {100 * above:.0f}% of the "
            f"{len(values)} (layer, pair) scores exceed 0.5"
        )
        if reference:
            mean = statistics.fmean(r[key] for r in reference.values())
            text += f"; random reference mean {mean:.3f}"
        lines.append(text + ".")
    return lines


def _mining_section(info: dict) -> list[str]:
    mine = info["mine"]
    lines = [
        "Rank d per layer and attribute (mean over blocks, min-max), and K of the integrated bank "
        "(after dropping directions already spanned):",
        "",
    ]
    lines += table(["layer kind", *mine["attributes"], "K"], _rank_rows(mine))
    dropped = sum(layer["dropped"] for layer in mine["layers"].values())
    lines += [
        "",
        f"Bank: {len(mine['K'])} layers, K = {sum(mine['K'].values())} columns in all, "
        f"{mine['trainable_params']:,} trainable M entries; {dropped} mined directions dropped as "
        f"already spanned; IRLS stopped after {mine['iterations']} iterations.",
    ]
    return lines + _overlap_lines(mine)


def _method_row(r: dict) -> list[str]:
    title = r["method"]
    if r["status"] != "ok":
        return [title, fmt(r.get("trainable_params")), f"{r['status']}: {r.get('error', '')}"] + [
            ""
        ] * (len(HEADLINE) + 5)
    test = r["test"]
    k = fmt(r["K_total"]) if "K_total" in r else "–"
    saved = r.get("saved_activation_bytes")
    peak = r.get("peak_memory_bytes")
    return (
        [title, fmt(r["trainable_params"]), k]
        + [fmt(test[key]) for key, _, _ in HEADLINE]
        + [
            fmt(r["train_error"]["error"]),
            fmt(r["test_error"]["error"]),
            fmt(r.get("step_ms"), 1),
            fmt(saved / 2**20 if saved else None, 2),
            fmt(peak / 2**20 if peak else None, 1),
        ]
    )


def _comparisons(methods: dict[str, dict]) -> list[str]:
    """The mined bank against each other method: on how many headline metrics it is better, and
    the paired test-error difference over the test scenes (negative: the bank is better)."""
    ours = methods.get("subspace")
    if ours is None or ours["status"] != "ok":
        return []
    lines = []
    for other in ("lora", "random", "psv", "single", "heads", "full", "zero-shot"):
        r = methods.get(other)
        if r is None or r["status"] != "ok":
            continue
        wins = [
            label
            for key, label, better in HEADLINE
            if (ours["test"][key] < r["test"][key]) == (better == "lower")
            and ours["test"][key] != r["test"][key]
        ]
        if "per_scene" not in ours["test_error"] or "per_scene" not in r["test_error"]:
            continue  # records of an older version hold means only: nothing to pair
        mean, se = paired_difference(ours["test_error"]["per_scene"], r["test_error"]["per_scene"])
        params = (
            f"{ours['trainable_params'] / r['trainable_params']:.2f}x its trainable parameters"
            if r["trainable_params"]
            else "no trained parameters there"
        )
        verdict = (
            "the bank is better"
            if mean < -2 * se
            else "the bank is worse"
            if mean > 2 * se
            else "no difference beyond 2 s.e."
        )
        lines.append(
            f"- vs {other}: **{verdict}** in test error; better on {len(wins)}/{len(HEADLINE)} "
            f"metrics ({', '.join(wins) or 'none'}); test error {ours['test_error']['error']:.4f} "
            f"vs {r['test_error']['error']:.4f}, paired difference {mean:+.4f} ± {se:.4f} (s.e., "
            f"{len(ours['test_error']['per_scene'])} scenes); {params}."
        )
    return lines


def _downstream_section(info: dict) -> list[str]:
    header = [
        "method",
        "trainable",
        "K",
        *(label for _, label, _ in HEADLINE),
        "train err",
        "test err",
        "step ms",
        "saved act. MiB",
        "peak MiB",
    ]
    lines = [
        "Test scenes of each held-out task. AbsRel and δ<1.25: depth after per-scene median "
        "scaling; AUC@30, RRA@15, RTA@15: relative poses over all frame pairs; Acc, Comp, Chamfer: "
        "the point cloud unprojected from predicted depth with predicted cameras, Sim(3)-aligned "
        "to the ground truth (unit = mean scene depth). Errors: loss_camera + loss_reg_depth. "
        "Saved activations: bytes autograd keeps for one training step.",
        "",
    ]
    for task, methods in info["finetune"].items():
        lines += [f"### {task}", ""]
        order = [m for m in METHOD_TITLES if m in methods]
        lines += table(header, [_method_row(methods[m]) for m in order])
        some = next((r for r in methods.values() if r.get("steps")), None)
        if some:
            lrs = {r["method"]: r["lr"] for r in methods.values() if r.get("lr")}
            lines += ["", f"{some['steps']} steps for every trained method; peak lr {lrs}."]
        comparisons = _comparisons(methods)
        if comparisons:
            lines += ["", "Mined subspace bank compared:", "", *comparisons]
        lines.append("")
    return lines


def _figures(info: dict, out: Path) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["(Figures skipped: matplotlib is not installed; `pip install attrspace[plot]`.)"]
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    lines = []
    if "mine" in info:
        figures.spectra_figure(info["mine"], folder / "spectra.png")
        lines.append("![spectra](figures/spectra.png)")
        if info["mine"]["mean_overlaps"]:
            figures.overlap_figure(info["mine"], folder / "overlaps.png")
            lines.append("![overlaps](figures/overlaps.png)")
    curves: dict[str, dict[str, list[float]]] = {}
    if "base_curve" in info:
        curves["pre-training"] = {"base": info["base_curve"]["objective"]}
    lora_curves = {}
    for attribute, loras in info["loras"].items():
        runs = [x["objective"] for x in loras.values()]
        n = min(len(r) for r in runs)
        lora_curves[attribute] = [statistics.fmean(r[i] for r in runs) for i in range(n)]
    curves["attribute LoRAs (mean)"] = lora_curves
    for task, methods in info["finetune"].items():
        curves[f"fine-tuning {task}"] = {m: r["curve"] for m, r in methods.items() if "curve" in r}
    if any(curves.values()):
        figures.curves_figure(curves, folder / "curves.png")
        lines.append("![training curves](figures/curves.png)")
    return lines


def write_report(out: str | Path) -> Path:
    """Write out/report.md (and out/figures/*.png when matplotlib is installed)."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"run folder not found: {out}")
    try:
        info = collect(out)
    except StageFileError as exc:
        raise StageFileError(f"cannot write the report of {out}: {exc}") from exc
    preset = info["runs"][-1]["preset"] if info["runs"] else "?"
    lines = [f"# attrspace pipeline report: preset `{preset}`", "", "## Machine and run", ""]
    lines += _machine_section(info)
    lines += ["", "## Stage times", "", *_stage_times(info)]
    if "base" in info:
        b = info["base"]
        lines += ["", "## Base model", ""]
        if "train_error" in b:
            lines.append(
                f"Pre-trained from scratch on the mixed family: {b['steps']} steps over "
                f"{b['scenes']} "
                f"scenes; final train error (loss_camera + loss_reg_depth) {b['train_error']:.4f}."
            )
        else:
            lines.append(f"Official checkpoint `{b.get('checkpoint')}` (no pre-training).")
    if info["loras"]:
        lines += ["", "## Attribute LoRAs", "", *_lora_section(info)]
    if "mine" in info:
        lines += ["", "## Mined subspaces", "", *_mining_section(info)]
    if info["finetune"]:
        lines += ["", "## Downstream fine-tuning", "", *_downstream_section(info)]
    study = study_section(out)
    if study:
        lines += ["", "## Study: a controlled test of the paper's claims", "", *study]
    figure_lines = _figures(info, out)
    if figure_lines:
        lines += ["", "## Figures", "", *(f"{x}\n" for x in figure_lines)]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
