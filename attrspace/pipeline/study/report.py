"""The study section of OUT/report.md: gates, learning rates, comparisons with their noise, control
spreads, specificity, overlaps and the paper's metrics, all read back from the study's files and
decided by verdict.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attrspace.pipeline.cache import MARKER, read_json
from attrspace.pipeline.presets import STUDY_BANKS, STUDY_METHODS
from attrspace.pipeline.report.figures import study_figure
from attrspace.pipeline.report.tables import table
from attrspace.pipeline.study.arms import RECORD_FILE
from attrspace.pipeline.study.endpoints import SECONDARY
from attrspace.pipeline.study.evidence import STATS_FILE
from attrspace.pipeline.study.lr import RATES_FILE
from attrspace.pipeline.study.stats import paired_two_way
from attrspace.pipeline.study.verdict import (
    BLOCK_GAIN_MIN,
    INIT_ENERGY_MAX,
    LORA_MOVE_MIN,
    PERTURB_DEPTH_MIN,
    PERTURB_POSE_MIN,
    compare,
    verdicts,
)

CLAIMS = (
    ("a", "attribute subspaces are specific and near-disentangled"),
    ("b", "the mined bank beats LoRA r=16 with <= 1/3 of its trainable (block) parameters"),
    ("c", "mined beats random, shuffled and pooled (bank-only); mined + heads beats heads-only"),
)


def collect_study(out: Path, arms: tuple[str, ...]) -> dict | None:
    """Stats of every LoRA set, banks.json, rates.json, the mine summary and every arm's records;
    None while the study is unfinished."""
    out = Path(out)
    stats_paths = sorted((out / "study" / "stats").glob(f"set*/{STATS_FILE}"))
    rates_path = out / "study" / "lr" / RATES_FILE
    if not stats_paths or not rates_path.exists():
        return None
    records: dict[str, list[dict]] = {}
    for arm in arms:
        found = sorted(
            (out / "study" / "arms" / arm.replace(":", "_")).glob(f"seed*/{RECORD_FILE}")
        )
        if not found:
            return None  # the arms stage has not finished
        records[arm] = [read_json(p, ("arm", "seed", "status")) for p in found]
    need = ("gates", "specificity", "held_out", "own_capture_wins", "overlaps")
    return {
        "sets": [read_json(p, need) for p in stats_paths],
        "banks": read_json(out / "study" / "banks" / "banks.json", ("K",)),
        "rates": read_json(rates_path, ("zero_shot_val_error", "arms")),
        "mine": read_json(out / "mine" / "summary.json", ("mean_overlaps", "random_overlaps")),
        "arms": records,
    }


def arms_in(out: Path) -> tuple[str, ...]:
    """The arms a study folder holds: the methods in STUDY_METHODS order, then the banks."""
    folder = Path(out) / "study" / "arms"
    names = [p.name for p in folder.glob("*") if p.is_dir()]
    arms = [n.replace("bank_", "bank:", 1) if n.startswith("bank_") else n for n in names]
    order = {m: i for i, m in enumerate((*STUDY_METHODS, *(f"bank:{b}" for b in STUDY_BANKS)))}
    return tuple(sorted(arms, key=lambda a: (order.get(a, len(order)), a)))


def _seconds(out: Path) -> dict[str, float]:
    """Wall seconds of the study's cache units from their markers (as first computed)."""
    study = Path(out) / "study"
    times = {}
    for key, pattern in (
        ("loras", "loras/*/*/*"),
        ("banks", "banks"),
        ("stats", "stats/*"),
        ("lr", "lr/*/*"),
        ("arms", "arms/*/seed*"),
    ):
        markers = [p / MARKER for p in study.glob(pattern) if (p / MARKER).exists()]
        times[key] = sum(read_json(m, ("seconds",))["seconds"] for m in markers)
        times[f"{key}_units"] = len(markers)
    return times


def _pm(c: dict) -> str:
    return f"{c['diff']:+.4f} ± {c['se']:.4f}"


def verdict_lines(v: dict) -> list[str]:
    lines = ["### Verdicts", ""]
    for claim, title in CLAIMS:
        x = v[claim]
        gated = ""
        if "gated_by" in x:
            gated = f" (gate {x['gated_by']} failed; as measured: {x['measured']})"
        lines.append(f"- **({claim}) {title}: {x['verdict'].upper()}**{gated}")
    a, dis = v["a"], v["a"]["disentanglement"]
    pairs = "pairs sharing no content" if a["content_controlled"] else "all pairs"
    lines.append(
        f"  - (a) specific: {a['specific']} (permutation p = {a['p_value']:.4f} over {pairs}; "
        f"own attribute captures a held-out LoRA best for {a['own_capture_wins']:.0%}); "
        f"near-disentangled: {a['near_disentangled']} (1 - cos θ1 over random reference: "
        f"columns {dis['col']['ratio']:.2f}, rows {dis['row']['ratio']:.2f})"
    )
    for c in v["b"]["comparisons"]:
        lines.append(
            f"  - (b) {c['arm']} vs {c['against']}: {c['outcome']}, {_pm(c)} (critical "
            f"{c['critical']:.2f} s.e., MDE {c['mde']:.4f}); block parameters "
            f"{c['param_ratio']:.3f}x ({'eligible' if c['eligible'] else 'over 1/3'})"
        )
    for c in v["c"]["comparisons"]:
        lines.append(
            f"  - (c) {c['arm']} vs {c['against']}: {c['outcome']}, {_pm(c)} "
            f"(critical {c['critical']:.2f} s.e., MDE {c['mde']:.4f})"
        )
    return lines


def gate_lines(g: dict) -> list[str]:
    g0 = g["g0"]
    p = g0["perturbation"]
    lines = [
        "### Gates",
        "",
        f"G0, blocks that matter: validation error zero-shot {g0['zero_shot_val']:.4f}; gain of "
        f"LoRA (blocks + heads) {g0['gain_all']:+.4f}, of block-only LoRA {g0['gain_blocks']:+.4f} "
        f"(share {g0['share']:.2f}, needs >= {BLOCK_GAIN_MIN}) -> "
        f"{'pass' if g0['recovers'] else 'FAIL'}; noise of {p['relative']} x ||W|| on every block "
        f"linear moves depth by {p['depth_change']:.3f} (needs >= {PERTURB_DEPTH_MIN}) and the "
        f"pose encoding by {p['pose_change']:.3f} (needs >= {PERTURB_POSE_MIN}) -> "
        f"{'pass' if g0['moves'] else 'FAIL'}. **G0 {'pass' if g['G0'] else 'FAIL'}**.",
        "",
    ]
    rows = [
        [
            f"set {i}",
            attr,
            f"{x['median_rel_change']:.3f}",
            f"{x['median_init_energy']:.3f}",
            "pass" if x["pass"] else "FAIL",
        ]
        for i, per_set in enumerate(g["loras"])
        for attr, x in per_set.items()
    ]
    lines += table(
        [
            "LoRA set",
            "attribute",
            f"median ‖A−A0‖/‖A0‖ (≥ {LORA_MOVE_MIN})",
            f"median update energy in A0's rows (≤ {INIT_ENERGY_MAX})",
            "G1",
        ],
        rows,
    )
    h = g["headroom"]
    return [
        *lines,
        "",
        f"G2 headroom: zero-shot {h['a']:.4f} vs full fine-tuning {h['b']:.4f}, difference "
        f"{_pm(h)} -> **{'pass' if g['G2'] else 'FAIL'}**.",
    ]


def rate_lines(rates: dict, order: list[str]) -> list[str]:
    rows = []
    for arm in sorted(rates["arms"], key=lambda a: order.index(a) if a in order else len(order)):
        s = rates["arms"][arm]
        grid = ", ".join(
            f"{lr:.3g}: {'div.' if e is None else f'{e:.4f}'}"
            for lr, e in zip(s["grid"], s["val_errors"], strict=True)
        )
        note = "at the edge of the grid" if s["at_edge"] else "inside"
        if s.get("heads_lr") is not None:
            note += f"; heads' LoRA at {s['heads_lr']:.3g}"
        rows.append([arm, f"**{s['chosen']:.3g}**", grid, note])
    return [
        "### Learning rates (chosen on the validation scenes)",
        "",
        *table(["arm", "chosen", "grid: validation error", "note"], rows),
    ]


def comparison_lines(v: dict) -> list[str]:
    rows = []
    for c in [v["gates"]["headroom"], *v["b"]["comparisons"], *v["c"]["comparisons"]]:
        rows.append(
            [
                f"{c['arm']} − {c['against']}",
                f"{c['diff']:+.4f}",
                f"{c['se_scenes']:.4f}",
                f"{c['se_seeds']:.4f}",
                f"{c['se']:.4f}",
                f"{c['df']:.1f}",
                f"{c['critical']:.2f}",
                f"{c['mde']:.4f}",
                c["outcome"],
            ]
        )
    header = [
        "comparison",
        "diff",
        "s.e. scenes",
        "s.e. seeds",
        "s.e.",
        "df",
        "t",
        "MDE",
        "outcome",
    ]
    return [
        "### Comparisons (test error, paired over seeds x test scenes)",
        "",
        "s.e. = sqrt(s.e. over scenes² + s.e. over seeds²); t: two-sided 95% quantile at the "
        "Welch-Satterthwaite df; MDE: the smallest difference detected with 80% power.",
        "",
        *table(header, rows),
    ]


def arm_lines(arms: dict[str, list[dict]], rates: dict) -> list[str]:
    rows = []
    for arm, records in arms.items():
        ok = [r for r in records if r.get("status") == "ok"]
        errs = [r["test_error"]["error"] for r in ok]
        rate = rates["arms"].get(arm, {}).get("chosen")
        rows.append(
            [
                arm,
                f"{records[0].get('trainable_params', 0):,}",
                f"{records[0].get('block_params', 0):,}",
                "–" if rate is None else f"{rate:.3g}",
                str(len(ok)),
                f"{np.mean(errs):.4f}" if errs else "–",
                f"{np.std(errs, ddof=1):.4f}" if len(errs) > 1 else "–",
                " ".join(f"{e:.4f}" for e in errs),
            ]
        )
    header = ["arm", "trainable", "in blocks", "lr", "runs", "test err", "sd", "per seed"]
    return [
        "### Arms and the spread of the controls",
        "",
        "Seed i of a bank arm trains with draw i of its bank (mined, pooled and shuffled banks "
        "from LoRA set i mod 2; shuffled and random banks drawn afresh per seed), so the sd over "
        "seeds of a control includes the spread of its draws.",
        "",
        *table(header, rows),
    ]


def _per_scene(records: list[dict], key: str) -> list[list[float]]:
    return [r["endpoints"][key] for r in sorted(records, key=lambda r: r["seed"])]


def endpoint_lines(arms: dict[str, list[dict]], v: dict) -> list[str]:
    rows = []
    for arm, records in arms.items():
        cells = [arm]
        for key, _, _ in SECONDARY:
            vals = [float(np.mean(r["endpoints"][key])) for r in records if "endpoints" in r]
            cells.append(f"{np.mean(vals):.4f}" if vals else "–")
        rows.append(cells)
    lines = [
        "### The paper's metrics (secondary endpoints)",
        "",
        "AbsRel and δ<1.25 after one scale-and-shift fit per test scene; Acc, Comp (unit: mean "
        "point distance to camera 0) and NC after Umeyama Sim(3) and point-to-point ICP "
        "(threshold 0.1). Mean over seeds and test scenes:",
        "",
        *table(["arm", *(t for _, t, _ in SECONDARY)], rows),
        "",
        "The claims' comparisons on these metrics (diff ± combined s.e.; sign as the metric):",
        "",
    ]
    rows = []
    for c in [*v["b"]["comparisons"], *v["c"]["comparisons"]]:
        cells = [f"{c['arm']} − {c['against']}"]
        for key, _, _ in SECONDARY:
            x, y = _per_scene(arms[c["arm"]], key), _per_scene(arms[c["against"]], key)
            cells.append(_pm(paired_two_way(x, y)))
        rows.append(cells)
    return lines + table(["comparison", *(t for _, t, _ in SECONDARY)], rows)


def specificity_lines(sets: list[dict]) -> list[str]:
    lines = ["### Attribute specificity", ""]
    for i, stats in enumerate(sets):
        for label, key in (
            ("all pairs", "specificity"),
            ("pairs sharing no content stream", "specificity_no_shared_content"),
        ):
            sp = stats.get(key)
            if sp is None:
                continue
            lines.append(
                f"- LoRA set {i}, {label}: cosine similarity of updates within an attribute "
                f"{sp['within']:.4f}, between {sp['between']:.4f}; difference "
                f"{sp['difference']:+.4f}, permutation p = {sp['p_value']:.4f} "
                f"({sp['permutations']} permutations)."
            )
    return [*lines, "", *capture_lines(sets[0])]


def capture_lines(stats: dict) -> list[str]:
    rows = []
    for attr in sorted({r["attribute"] for r in stats["held_out"]}):
        mine_rows = [r for r in stats["held_out"] if r["attribute"] == attr]
        own = np.mean([r["capture"][attr] for r in mine_rows])
        other = np.mean(
            [np.mean([x for b, x in r["capture"].items() if b != attr]) for r in mine_rows]
        )
        rand = np.mean([r["random"] for r in mine_rows])
        win = np.mean(
            [
                r["capture"][attr] > max(x for b, x in r["capture"].items() if b != attr)
                for r in mine_rows
            ]
        )
        rows.append([attr, f"{own:.4f}", f"{other:.4f}", f"{rand:.4f}", f"{win:.0%}"])
    return [
        "Held-out capture (LoRA set 0): share of a LoRA's update energy inside its own "
        "attribute's subspace mined without it, the other attributes', and random subspaces:",
        "",
        *table(["attribute", "own", "others (mean)", "random", "own best"], rows),
    ]


def overlap_lines(sets: list[dict], v: dict) -> list[str]:
    dis = v["a"]["disentanglement"]
    rows = []
    for i, stats in enumerate(sets):
        o = stats["overlaps"]
        for side, name in (("col", "columns (U)"), ("row", "rows (V)")):
            rows.append(
                [
                    f"set {i}",
                    name,
                    f"{o['attributes'][side]:.3f}",
                    f"{o['split_half'][side]:.3f}",
                    f"{o['shuffled_groups'][side]:.3f}",
                    f"{dis[side]['random']:.3f}",
                ]
            )
    return [
        "### Overlaps and their references",
        "",
        "Mean over layers and pairs of 1 - cos θ1 (1 = orthogonal): between attributes; between "
        "the two halves of one attribute's LoRAs (split-half: the same attribute); between "
        "shuffled groups (no attribute structure); random subspaces of the same sizes.",
        "",
        *table(["LoRA set", "side", "attributes", "split-half", "shuffled groups", "random"], rows),
    ]


def _figure(out: Path, info: dict) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["(Study figure skipped: matplotlib is not installed.)"]
    arms = info["arms"]
    comparisons = [compare(arms, a, "bank:mined") for a in arms if a != "bank:mined"]
    folder = Path(out) / "figures"
    folder.mkdir(exist_ok=True)
    stats = info["sets"][0]
    study_figure(comparisons, stats["similarity"], stats["labels"], folder / "study.png")
    return ["![study](figures/study.png)"]


def study_section(out: Path) -> list[str]:
    """Markdown lines of the study section (empty when the run has no finished study)."""
    info = collect_study(out, arms_in(out))
    if info is None:
        return []
    try:
        v = verdicts(info["sets"], info["mine"], info["rates"], info["arms"])
    except ValueError as exc:  # an arm diverged or failed evaluation: no verdict can be computed
        return [f"The study's verdicts cannot be computed: {exc}."]
    t = _seconds(out)
    return [
        "Decision rule: `attrspace/pipeline/study/verdict.py` (also docs/study/protocol.md), "
        "fixed before the run. Primary endpoint: test error (loss_camera + loss_reg_depth).",
        "",
        *verdict_lines(v),
        "",
        *gate_lines(v["gates"]),
        "",
        *rate_lines(info["rates"], list(info["arms"])),
        "",
        *comparison_lines(v),
        "",
        *arm_lines(info["arms"], info["rates"]),
        "",
        *endpoint_lines(info["arms"], v),
        "",
        *specificity_lines(info["sets"]),
        "",
        *overlap_lines(info["sets"], v),
        "",
        f"Study wall times (as first computed): LoRA sets >= 1 {t['loras']:.0f} s "
        f"({t['loras_units']} LoRAs), banks {t['banks']:.0f} s, statistics {t['stats']:.0f} s, "
        f"learning-rate search {t['lr']:.0f} s ({t['lr_units']} runs), arms {t['arms']:.0f} s "
        f"({t['arms_units']} runs).",
        "",
        *_figure(out, info),
    ]
