"""The decision rule of the study, fixed before any study run (docs/study/protocol.md says the
same in prose). Every threshold lives here; the report only formats what `verdicts` returns.

Primary endpoint: test error (loss_camera + loss_reg_depth) on the study task's test scenes. Every
comparison of two arms is paired over data-order seeds x test scenes, with
s.e. = max(s.e. over scenes, s.e. over seeds) (study_stats.paired_two_way). A comparison is
"better" when diff < -2 s.e., "worse" when diff > +2 s.e., else "tie".

Gates (validity of the protocol, not claims):
- G1 LoRAs learn: for every attribute, median over (LoRA, block linear) of ||A - A0|| / ||A0||
  >= 0.35 and median share of the update's energy in A0's row space <= 0.75.
- G2 headroom: zero-shot is worse than full fine-tuning by > 2 s.e.
A failed G1 makes every claim inconclusive (the subspaces would mirror the random init); a failed
G2 makes (b) and (c) inconclusive (no room for methods to differ).

(a) Attribute subspaces are specific and near-disentangled.
    specific: yes when the permutation p-value of (within - between update similarity) < 0.01
    and the held-out LoRA's own attribute captures more of it than every other attribute for
    >= 75% of the LoRAs; no when p >= 0.05 or that share < 50%.
    near-disentangled: r = mean 1 - cos(theta_1) over layers and pairs divided by the same mean
    for random subspaces of the same sizes, for column and row spaces; yes when both r >= 0.9,
    no when either r < 0.6.
    holds: specific and near-disentangled both yes; refuted: either no; else inconclusive.
(b) The mined bank beats LoRA r=16 with at most 1/3 of its trainable parameters.
    Eligible arms: "subspace" (mined bank + heads' LoRA) and "bank:mined" (bank only) whose
    trainable parameters are <= 1/3 of the "lora" arm's. holds: some eligible arm is better than
    lora; refuted: no arm is eligible, or every eligible arm is worse; else inconclusive.
(c) Mining by attribute matters: bank-only mined is better than every random bank, the shuffled
    bank and the pooled bank, and mined + heads is better than heads-only.
    holds: all of these comparisons better; refuted: any of them worse; else inconclusive.
"""

from __future__ import annotations

from .study_stats import paired_two_way

LORA_MOVE_MIN, INIT_ENERGY_MAX = 0.35, 0.75
SPECIFIC_P, NOT_SPECIFIC_P = 0.01, 0.05
WIN_YES, WIN_NO = 0.75, 0.5
DISENTANGLED_YES, DISENTANGLED_NO = 0.9, 0.6
PARAM_RATIO_MAX = 1 / 3
SE_MULTIPLE = 2.0


def outcome(comparison: dict) -> str:
    if comparison["diff"] < -SE_MULTIPLE * comparison["se"]:
        return "better"
    if comparison["diff"] > SE_MULTIPLE * comparison["se"]:
        return "worse"
    return "tie"


def errors(records: list[dict]) -> list[list[float]]:
    """seeds x scenes test errors of one arm's records (sorted by seed)."""
    bad = [r for r in records if r.get("status") != "ok"]
    if bad:
        raise ValueError(f"arm {bad[0]['arm']} seed {bad[0]['seed']}: {bad[0]['status']}")
    return [r["test_error"]["per_scene"] for r in sorted(records, key=lambda r: r["seed"])]


def compare(arms: dict[str, list[dict]], a: str, b: str) -> dict:
    """Paired comparison of arm a against arm b (zero-shot is repeated to b's seed count)."""
    x, y = errors(arms[a]), errors(arms[b])
    if len(x) == 1 and len(y) > 1:
        x = x * len(y)
    if len(y) == 1 and len(x) > 1:
        y = y * len(x)
    out = paired_two_way(x, y)
    out.update(arm=a, against=b, outcome=outcome(out))
    return out


def gates(stats: dict, arms: dict[str, list[dict]]) -> dict:
    per_attribute = {
        a: {
            **g,
            "pass": g["median_rel_change"] >= LORA_MOVE_MIN
            and g["median_init_energy"] <= INIT_ENERGY_MAX,
        }
        for a, g in stats["gates"].items()
    }
    headroom = compare(arms, "zero-shot", "full")
    return {
        "loras": per_attribute,
        "G1": all(g["pass"] for g in per_attribute.values()),
        "headroom": headroom,
        "G2": headroom["diff"] > SE_MULTIPLE * headroom["se"],
    }


def disentanglement(mine_summary: dict) -> dict:
    mean, ref = mine_summary["mean_overlaps"], mine_summary["random_overlaps"]
    out = {}
    for side in ("col", "row"):
        score = sum(v[side] for v in mean.values()) / len(mean)
        reference = sum(v[side] for v in ref.values()) / len(ref)
        out[side] = {"score": score, "random": reference, "ratio": score / reference}
    return out


def verdicts(stats: dict, mine_summary: dict, arms: dict[str, list[dict]]) -> dict:
    """Gates, the comparisons and the verdict of each claim (see the module doc)."""
    g = gates(stats, arms)
    result: dict = {"gates": g}
    # (a)
    p = stats["specificity"]["p_value"]
    wins = stats["own_capture_wins"]
    dis = disentanglement(mine_summary)
    low = min(dis["col"]["ratio"], dis["row"]["ratio"])
    specific = "yes" if p < SPECIFIC_P and wins >= WIN_YES else "no"
    if specific == "no" and not (p >= NOT_SPECIFIC_P or wins < WIN_NO):
        specific = "unclear"
    near = "yes" if low >= DISENTANGLED_YES else ("no" if low < DISENTANGLED_NO else "unclear")
    a = "holds" if specific == near == "yes" else ("refuted" if "no" in (specific, near) else "")
    result["a"] = {
        "verdict": a or "inconclusive",
        "specific": specific,
        "near_disentangled": near,
        "p_value": p,
        "own_capture_wins": wins,
        "disentanglement": dis,
    }
    # (b)
    lora_params = arms["lora"][0]["trainable_params"]
    rows = []
    for arm in ("subspace", "bank:mined"):
        c = compare(arms, arm, "lora")
        c["param_ratio"] = arms[arm][0]["trainable_params"] / lora_params
        c["eligible"] = c["param_ratio"] <= PARAM_RATIO_MAX
        rows.append(c)
    eligible = [c for c in rows if c["eligible"]]
    if any(c["outcome"] == "better" for c in eligible):
        b = "holds"
    elif not eligible or all(c["outcome"] == "worse" for c in eligible):
        b = "refuted"
    else:
        b = "inconclusive"
    result["b"] = {"verdict": b, "comparisons": rows}
    # (c)
    controls = [x for x in arms if x.startswith("bank:random")] + ["bank:shuffled", "bank:pooled"]
    rows = [compare(arms, "bank:mined", x) for x in controls]
    rows.append(compare(arms, "subspace", "heads"))
    outcomes = [c["outcome"] for c in rows]
    c_verdict = (
        "holds"
        if all(o == "better" for o in outcomes)
        else ("refuted" if "worse" in outcomes else "inconclusive")
    )
    result["c"] = {"verdict": c_verdict, "comparisons": rows}
    # Gates override: a protocol that failed its gate cannot decide the claims it guards.
    for claim, gate in (("a", "G1"), ("b", "G1"), ("c", "G1"), ("b", "G2"), ("c", "G2")):
        if not g[gate] and result[claim]["verdict"] != "inconclusive":
            result[claim]["verdict"] = "inconclusive"
            result[claim]["gated_by"] = gate
        elif not g[gate]:
            result[claim]["gated_by"] = gate
    return result
