"""The study section of OUT/report.md: gates, controls, statistics and the verdict of each claim,
all read back from the study stage's files and decided by study_verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import MARKER, read_json
from .presets import STUDY_BANKS, STUDY_METHODS
from .study import RECORD_FILE, STATS_FILE
from .study_verdict import (
    INIT_ENERGY_MAX,
    LORA_MOVE_MIN,
    compare,
    verdicts,
)


def collect_study(out: Path, arms: tuple[str, ...]) -> dict | None:
    """stats.json, banks.json, the mine summary and every arm's records; None without a study."""
    out = Path(out)
    stats_path = out / "study" / "stats" / STATS_FILE
    if not stats_path.exists():
        return None
    records: dict[str, list[dict]] = {}
    for arm in arms:
        folder = out / "study" / "arms" / arm.replace(":", "_")
        found = sorted(folder.glob(f"seed*/{RECORD_FILE}"))
        if not found:
            return None  # the arms stage has not finished
        records[arm] = [read_json(p, ("arm", "seed", "status")) for p in found]
    return {
        "stats": read_json(stats_path, ("gates", "specificity", "held_out", "own_capture_wins")),
        "banks": read_json(out / "study" / "banks" / "banks.json", ("K",)),
        "mine": read_json(out / "mine" / "summary.json", ("mean_overlaps", "random_overlaps")),
        "arms": records,
    }


def _arms_from_folders(out: Path) -> tuple[str, ...]:
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
    for key, pattern in (("banks", "banks"), ("stats", "stats"), ("arms", "arms/*/seed*")):
        markers = [p / MARKER for p in study.glob(pattern) if (p / MARKER).exists()]
        times[key] = sum(read_json(m, ("seconds",))["seconds"] for m in markers)
        times[f"{key}_units"] = len(markers)
    return times


def _figure(out: Path, info: dict) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["(Study figure skipped: matplotlib is not installed.)"]
    from .figures import study_figure

    arms = info["arms"]
    comparisons = [compare(arms, a, "bank:mined") for a in arms if a != "bank:mined"]
    folder = Path(out) / "figures"
    folder.mkdir(exist_ok=True)
    stats = info["stats"]
    study_figure(comparisons, stats["similarity"], stats["labels"], folder / "study.png")
    return ["![study](figures/study.png)"]


def _pm(c: dict) -> str:
    return f"{c['diff']:+.4f} ± {c['se']:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def study_section(out: Path) -> list[str]:
    """Markdown lines of the study section (empty when the run has no finished study)."""
    info = collect_study(out, _arms_from_folders(out))
    if info is None:
        return []
    stats, arms = info["stats"], info["arms"]
    try:
        v = verdicts(stats, info["mine"], arms)
    except ValueError as exc:  # an arm diverged or failed evaluation: no verdict can be computed
        return [f"The study's verdicts cannot be computed: {exc}."]
    g = v["gates"]
    lines = [
        "Decision rule: `attrspace/pipeline/study_verdict.py` (also docs/study/protocol.md), "
        "fixed before the run. Endpoint: test error (loss_camera + loss_reg_depth), paired over "
        "seeds x test scenes; s.e. = max(s.e. over scenes, s.e. over seeds).",
        "",
        "### Verdicts",
        "",
    ]
    for claim, title in (
        ("a", "attribute subspaces are specific and near-disentangled"),
        ("b", "the mined bank beats LoRA r=16 with <= 1/3 of its trainable parameters"),
        (
            "c",
            "mined beats random (every seed), shuffled and pooled (bank-only); "
            "mined + heads beats heads-only",
        ),
    ):
        gated = f" (gate {v[claim]['gated_by']} failed)" if "gated_by" in v[claim] else ""
        lines.append(f"- **({claim}) {title}: {v[claim]['verdict'].upper()}**{gated}")
    a = v["a"]
    dis = a["disentanglement"]
    lines += [
        f"  - (a) specific: {a['specific']} (permutation p = {a['p_value']:.4f}; own attribute "
        f"captures a held-out LoRA best for {a['own_capture_wins']:.0%}); near-disentangled: "
        f"{a['near_disentangled']} (1 - cos θ1 over random reference: columns "
        f"{dis['col']['ratio']:.2f}, rows {dis['row']['ratio']:.2f})",
    ]
    for c in v["b"]["comparisons"]:
        lines.append(
            f"  - (b) {c['arm']} vs lora: {c['outcome']}, {_pm(c)}; "
            f"{c['param_ratio']:.2f}x its parameters ({'eligible' if c['eligible'] else 'over 1/3'})"
        )
    for c in v["c"]["comparisons"]:
        lines.append(f"  - (c) {c['arm']} vs {c['against']}: {c['outcome']}, {_pm(c)}")
    lines += ["", "### Gates", ""]
    rows = [
        [
            attr,
            f"{x['median_rel_change']:.3f}",
            f"{x['median_init_energy']:.3f}",
            "pass" if x["pass"] else "FAIL",
        ]
        for attr, x in g["loras"].items()
    ]
    lines += _table(
        [
            "attribute",
            f"median ‖A−A0‖/‖A0‖ (≥ {LORA_MOVE_MIN})",
            f"median update energy in A0's rows (≤ {INIT_ENERGY_MAX})",
            "G1",
        ],
        rows,
    )
    h = g["headroom"]
    lines += [
        "",
        f"G2 headroom: zero-shot {h['a']:.4f} vs full fine-tuning {h['b']:.4f}, difference "
        f"{_pm(h)} -> **{'pass' if g['G2'] else 'FAIL'}**.",
        "",
        "### Attribute specificity",
        "",
    ]
    sp = stats["specificity"]
    lines += [
        f"Cosine similarity of LoRA updates (mean over block linears): within an attribute "
        f"{sp['within']:.4f}, between attributes {sp['between']:.4f}; difference "
        f"{sp['difference']:+.4f}, permutation p = {sp['p_value']:.4f} "
        f"({sp['permutations']} label permutations).",
        "",
        "Held-out capture: share of a LoRA's update energy (mean over block linears) inside "
        "U M V^T of its own attribute's subspace mined without it, of the other attributes', and "
        "of random subspaces of the same sizes:",
        "",
    ]
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
    lines += _table(["attribute", "own", "others (mean)", "random", "own best"], rows)
    lines += [
        "",
        "Overlaps against random subspaces of the same sizes (mean over layers and "
        "attribute pairs of 1 - cos θ1):",
        "",
    ]
    lines += _table(
        ["side", "mined", "random reference", "ratio"],
        [
            [s, f"{d['score']:.3f}", f"{d['random']:.3f}", f"{d['ratio']:.2f}"]
            for s, d in (("columns (U)", dis["col"]), ("rows (V)", dis["row"]))
        ],
    )
    lines += ["", "### Arms", ""]
    rows = []
    for arm, records in arms.items():
        ok = [r for r in records if r.get("status") == "ok"]
        errs = [r["test_error"]["error"] for r in ok]
        c = compare(arms, arm, "bank:mined") if arm != "bank:mined" and ok else None
        rows.append(
            [
                arm,
                f"{records[0].get('trainable_params', 0):,}",
                str(records[0].get("K_total", "–")),
                str(len(ok)),
                f"{np.mean(errs):.4f}" if errs else "–",
                f"{np.std(errs, ddof=1):.4f}" if len(errs) > 1 else "–",
                f"{ok[0]['test']['abs_rel']:.3f}" if ok else "–",
                _pm(c) if c else "–",
            ]
        )
    lines += _table(
        [
            "arm",
            "trainable",
            "K",
            "seeds",
            "test err",
            "sd over seeds",
            "AbsRel (seed 0)",
            "vs bank:mined (arm − mined)",
        ],
        rows,
    )
    t = _seconds(out)
    lines += [
        "",
        f"Study stage wall times (as first computed): control banks {t['banks']:.1f} s, "
        f"statistics {t['stats']:.1f} s, {t['arms_units']} fine-tuning runs {t['arms']:.1f} s.",
    ]
    k = info["banks"]["K"]
    lines += [
        "",
        "K of the control banks (sum over layers): "
        + ", ".join(f"{n} {sum(x.values())}" for n, x in k.items())
        + ".",
    ]
    lines += ["", *_figure(out, info)]
    return lines
