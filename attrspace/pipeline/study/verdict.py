"""The decision rule of the study, fixed before the study run (docs/study/protocol.md says the
same in prose). Every threshold lives here; the report only formats what `verdicts` returns.

Primary endpoint: test error (loss_camera + loss_reg_depth) on the study task's test scenes. Every
comparison of two arms is paired over data-order seeds x test scenes (stats.paired_two_way):
se = sqrt(se_scenes^2 + se_seeds^2), critical value t_{0.975} at the Welch-Satterthwaite df.
"better" when diff < -critical x se, "worse" when diff > +critical x se, else "tie". Each arm
trains at its own rate, chosen on validation scenes (lr.py).

Gates (validity of the protocol, not claims):
- G0 blocks that matter: (i) block-only LoRA recovers >= 1/2 of all-LoRA's validation gain over
  zero-shot (each at its chosen rate; all-LoRA's gain > 0), and (ii) Gaussian noise of 0.5 x ||W||
  on every block linear moves the predicted depth by >= 5% (mean |d' - d| / d) and the pose
  encoding by >= 5% (mean ||p' - p|| / ||p||) on the validation scenes.
- G1 LoRAs learn: in every LoRA set, for every attribute, median over (LoRA, block linear) of
  ||A - A0|| / ||A0|| >= 0.35 and median share of the update's energy in A0's row space <= 0.75.
- G2 headroom: zero-shot is worse than full fine-tuning ("worse" above).
A failed G1 makes every claim inconclusive; a failed G2 makes (b) and (c) inconclusive; a failed
G0 makes (b) and (c) "not testable at this scale" (the blocks, where the bank lives, do not carry
the prediction, so no block method can differ).

(a) Attribute subspaces are specific and near-disentangled (LoRA set 0; set 1 is reported).
    specific: yes when the permutation p-value of (within - between update similarity), over the
    LoRA pairs that share no content stream (all pairs when the families have one stream), is
    < 0.01 and the held-out LoRA's own attribute captures more of it than every other attribute
    for >= 75% of the LoRAs; no when p >= 0.05 or that share < 50%.
    near-disentangled: r = mean 1 - cos(theta_1) over layers and attribute pairs divided by the
    same mean for random subspaces of the same sizes, for column and row spaces; yes when both
    r >= 0.9, no when either r < 0.6. (Split-half and shuffled-group references are reported.)
    holds: specific and near-disentangled both yes; refuted: either no; else inconclusive.
(b) The mined bank beats LoRA r=16 with at most 1/3 of its trainable parameters. The heads'
    adaptation is the same in both arms of each comparison, so parameters are counted in the
    blocks: "subspace" (bank + heads' LoRA) vs "lora" (LoRA on blocks and heads), and
    "bank:mined" vs "block-lora" (blocks only, no heads' adaptation in either). A comparison is
    eligible when the bank arm's block parameters are <= 1/3 of the LoRA arm's.
    holds: some eligible comparison better and none worse; refuted: every eligible comparison
    worse; no eligible comparison, or anything else: inconclusive.
(c) Mining by attribute matters: bank-only mined is better than the random, the shuffled and the
    pooled bank (each seed with its own draw of the control), and mined + heads is better than
    heads-only. holds: all better; refuted: any worse; else inconclusive.
"""

from __future__ import annotations

from attrspace.pipeline.study.stats import paired_two_way

LORA_MOVE_MIN, INIT_ENERGY_MAX = 0.35, 0.75
SPECIFIC_P, NOT_SPECIFIC_P = 0.01, 0.05
WIN_YES, WIN_NO = 0.75, 0.5
DISENTANGLED_YES, DISENTANGLED_NO = 0.9, 0.6
PARAM_RATIO_MAX = 1 / 3
BLOCK_GAIN_MIN = 0.5
PERTURB_DEPTH_MIN, PERTURB_POSE_MIN = 0.05, 0.05
NOT_TESTABLE = "not testable at this scale"


def outcome(comparison: dict) -> str:
    bound = comparison["critical"] * comparison["se"]
    if comparison["diff"] < -bound:
        return "better"
    if comparison["diff"] > bound:
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


def gate_g0(rates: dict, perturbation: dict) -> dict:
    """G0 from the validation searches (rates.json) and the perturbation of the block linears."""
    zero = rates["zero_shot_val_error"]
    gain_all = zero - rates["arms"]["lora"]["val_error"]
    gain_blocks = zero - rates["arms"]["block-lora"]["val_error"]
    share = gain_blocks / gain_all if gain_all > 0 else float("nan")
    recovers = gain_all > 0 and gain_blocks >= BLOCK_GAIN_MIN * gain_all
    moves = (
        perturbation["depth_change"] >= PERTURB_DEPTH_MIN
        and perturbation["pose_change"] >= PERTURB_POSE_MIN
    )
    return {
        "zero_shot_val": zero,
        "gain_all": gain_all,
        "gain_blocks": gain_blocks,
        "share": share,
        "recovers": recovers,
        "perturbation": perturbation,
        "moves": moves,
        "pass": recovers and moves,
    }


def gates(sets: list[dict], rates: dict, arms: dict[str, list[dict]]) -> dict:
    per_set = []
    for stats in sets:
        per_set.append(
            {
                a: {
                    **g,
                    "pass": g["median_rel_change"] >= LORA_MOVE_MIN
                    and g["median_init_energy"] <= INIT_ENERGY_MAX,
                }
                for a, g in stats["gates"].items()
            }
        )
    headroom = compare(arms, "zero-shot", "full")
    g0 = gate_g0(rates, sets[0]["perturbation"])
    return {
        "loras": per_set,
        "G0": g0["pass"],
        "g0": g0,
        "G1": all(g["pass"] for s in per_set for g in s.values()),
        "headroom": headroom,
        "G2": headroom["outcome"] == "worse",
    }


def disentanglement(mine_summary: dict) -> dict:
    mean, ref = mine_summary["mean_overlaps"], mine_summary["random_overlaps"]
    out = {}
    for side in ("col", "row"):
        score = sum(v[side] for v in mean.values()) / len(mean)
        reference = sum(v[side] for v in ref.values()) / len(ref)
        out[side] = {"score": score, "random": reference, "ratio": score / reference}
    return out


def claim_a(stats: dict, mine_summary: dict) -> dict:
    test = stats.get("specificity_no_shared_content") or stats["specificity"]
    p, wins = test["p_value"], stats["own_capture_wins"]
    dis = disentanglement(mine_summary)
    low = min(dis["col"]["ratio"], dis["row"]["ratio"])
    specific = "yes" if p < SPECIFIC_P and wins >= WIN_YES else "no"
    if specific == "no" and not (p >= NOT_SPECIFIC_P or wins < WIN_NO):
        specific = "unclear"
    near = "yes" if low >= DISENTANGLED_YES else ("no" if low < DISENTANGLED_NO else "unclear")
    a = "holds" if specific == near == "yes" else ("refuted" if "no" in (specific, near) else "")
    return {
        "verdict": a or "inconclusive",
        "specific": specific,
        "near_disentangled": near,
        "p_value": p,
        "content_controlled": "specificity_no_shared_content" in stats
        and stats["specificity_no_shared_content"] is not None,
        "own_capture_wins": wins,
        "disentanglement": dis,
    }


def claim_b(arms: dict[str, list[dict]]) -> dict:
    rows = []
    for arm, against in (("subspace", "lora"), ("bank:mined", "block-lora")):
        c = compare(arms, arm, against)
        c["param_ratio"] = arms[arm][0]["block_params"] / arms[against][0]["block_params"]
        c["eligible"] = c["param_ratio"] <= PARAM_RATIO_MAX
        rows.append(c)
    eligible = [c["outcome"] for c in rows if c["eligible"]]
    if "better" in eligible and "worse" not in eligible:
        verdict = "holds"
    elif eligible and all(o == "worse" for o in eligible):
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "comparisons": rows}


def claim_c(arms: dict[str, list[dict]]) -> dict:
    rows = [compare(arms, "bank:mined", x) for x in ("bank:random", "bank:shuffled", "bank:pooled")]
    rows.append(compare(arms, "subspace", "heads"))
    outcomes = [c["outcome"] for c in rows]
    if all(o == "better" for o in outcomes):
        verdict = "holds"
    else:
        verdict = "refuted" if "worse" in outcomes else "inconclusive"
    return {"verdict": verdict, "comparisons": rows}


def verdicts(sets: list[dict], mine_summary: dict, rates: dict, arms: dict) -> dict:
    """Gates, the comparisons and the verdict of each claim (see the module doc). sets: the
    stats.json of every LoRA set (set 0 first)."""
    g = gates(sets, rates, arms)
    result = {
        "gates": g,
        "a": claim_a(sets[0], mine_summary),
        "b": claim_b(arms),
        "c": claim_c(arms),
    }
    # A protocol that failed a gate cannot decide the claims it guards (G1 first: it voids all).
    for claim, gate, verdict in (
        ("a", "G1", "inconclusive"),
        ("b", "G1", "inconclusive"),
        ("c", "G1", "inconclusive"),
        ("b", "G0", NOT_TESTABLE),
        ("c", "G0", NOT_TESTABLE),
        ("b", "G2", "inconclusive"),
        ("c", "G2", "inconclusive"),
    ):
        if not g[gate] and "gated_by" not in result[claim]:
            result[claim]["measured"] = result[claim]["verdict"]
            result[claim]["verdict"] = verdict
            result[claim]["gated_by"] = gate
    return result
