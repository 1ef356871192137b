"""The statistics of the study (see arms.py): how far the attribute LoRAs moved from their
initialisation, how attribute-specific their updates are, how well a held-out LoRA is captured by
its own attribute's subspace, and paired comparisons of fine-tuning errors over scenes and seeds.

Updates are kept in factor form (P (d_out, r), Q (d_in, r), update P Q^T); every inner product is
computed from r x r Gram matrices, never from d_out x d_in products.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch
from scipy.stats import t as student_t
from torch import Tensor

Factors = tuple[Tensor, Tensor]


def lora_movement(A: Tensor, A0: Tensor, B: Tensor) -> dict[str, float]:
    """How much one LoRA layer learned. A, A0: trained and initial (r, d_in); B: trained (d_out, r).

    rel_change = ||A - A0|| / ||A0||; init_energy = the share of the update's energy ||B A||^2 that
    lies in the row space of A0, i.e. what the random initial A alone explains (1 when A never
    moved, about r / d_in for an A unrelated to A0)."""
    if A.shape != A0.shape or B.shape[1] != A.shape[0]:
        raise ValueError(f"A {tuple(A.shape)}, A0 {tuple(A0.shape)}, B {tuple(B.shape)} misfit")
    A, A0, B = A.double(), A0.double(), B.double()
    rel = float((A - A0).norm() / A0.norm())
    q0, _ = torch.linalg.qr(A0.t())  # (d_in, r): orthonormal basis of A0's row space
    update = B @ A
    total = float(update.pow(2).sum())
    inside = float((update @ q0).pow(2).sum())
    return {"rel_change": rel, "init_energy": inside / total if total > 0 else 1.0}


def _inner(x: Factors, y: Factors) -> float:
    """<P_x Q_x^T, P_y Q_y^T>_F from Gram matrices."""
    return float(((x[0].t() @ y[0]) * (x[1].t() @ y[1])).sum())


def similarity_matrix(loras: list[dict[str, Factors]], layers: list[str]) -> np.ndarray:
    """Cosine similarity <dW_i, dW_j> / (||dW_i|| ||dW_j||) of every pair of LoRAs, averaged over
    `layers` (n x n, ones on the diagonal)."""
    n = len(loras)
    out = np.zeros((n, n))
    for name in layers:
        f = [(lora[name][0].double(), lora[name][1].double()) for lora in loras]
        norms = [math.sqrt(max(_inner(x, x), 1e-300)) for x in f]
        for i in range(n):
            for j in range(i, n):
                c = _inner(f[i], f[j]) / (norms[i] * norms[j])
                out[i, j] += c
                if i != j:
                    out[j, i] += c
    return out / len(layers)


def within_minus_between(
    sim: np.ndarray, labels: list[str], allowed: np.ndarray | None = None
) -> tuple[float, float]:
    """Mean similarity of pairs with the same label and of pairs with different labels, over the
    pairs `allowed` marks (n x n bool; e.g. pairs that share no content) or all pairs."""
    lab = np.asarray(labels)
    same = lab[:, None] == lab[None, :]
    keep = ~np.eye(len(lab), dtype=bool)
    if allowed is not None:
        keep &= np.asarray(allowed, dtype=bool)
    within = sim[same & keep]
    between = sim[~same & keep]
    if within.size == 0 or between.size == 0:
        raise ValueError("need at least two labels and two allowed LoRAs of some label")
    return float(within.mean()), float(between.mean())


def specificity_test(
    sim: np.ndarray,
    labels: list[str],
    permutations: int,
    seed: int,
    allowed: np.ndarray | None = None,
) -> dict[str, float]:
    """Within minus between similarity (over the `allowed` pairs), and its permutation p-value: the
    share of label permutations (counts kept; `allowed` stays with the LoRAs) whose difference is
    at least as large, counting the observed one, (1 + #{T_perm >= T}) / (1 + permutations)."""
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    within, between = within_minus_between(sim, labels, allowed)
    observed = within - between
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)
    hits = 0
    for _ in range(permutations):
        w, b = within_minus_between(sim, list(rng.permutation(lab)), allowed)
        hits += (w - b) >= observed - 1e-12
    return {
        "within": within,
        "between": between,
        "difference": observed,
        "p_value": (1 + hits) / (1 + permutations),
        "permutations": permutations,
    }


def capture(update: Factors, U: Tensor, V: Tensor) -> float:
    """Share of an update's energy a bank with orthonormal U (d_out, K), V (d_in, K) can represent:
    ||U^T dW V||_F^2 / ||dW||_F^2 (the best U M V^T approximation of dW)."""
    P, Q = update[0].double(), update[1].double()
    inner = (U.double().t() @ P) @ (Q.t() @ V.double())
    total = _inner((P, Q), (P, Q))
    return float(inner.pow(2).sum() / total) if total > 0 else 0.0


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def satterthwaite_df(parts: list[tuple[float, int]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance estimates (variance, df)."""
    total = sum(v for v, _ in parts)
    denominator = sum(v * v / df for v, df in parts if df > 0)
    if total <= 0 or denominator <= 0:
        return float(max(1, min(df for _, df in parts)))
    return total * total / denominator


def paired_two_way(
    a: list[list[float]], b: list[list[float]], alpha: float = 0.05, power: float = 0.8
) -> dict[str, float]:
    """Paired comparison of two methods' errors over seeds x scenes (a[s][i], b[s][i]: seed s,
    test scene i; the same batches and scenes for both).

    diff = mean of a - b. se_scenes: s.e. over scenes of the seed-averaged differences (which
    scenes are tested); se_seeds: s.e. over seeds of the scene-averaged differences (data order,
    init, and whatever else a seed draws, e.g. the control bank). The two add: se = sqrt(se_scenes^2
    + se_seeds^2) (slightly conservative: the interaction counts in both). The critical value is the
    two-sided t quantile at the Welch-Satterthwaite df of that sum; mde is the smallest |diff| that
    such a test detects with probability `power` ((t_{1-alpha/2} + t_{power}) x se)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] < 2 or x.shape[0] < 2:
        raise ValueError(
            f"need equal (seeds >= 2, scenes >= 2) arrays, got {x.shape} and {y.shape}"
        )
    d = x - y
    per_scene, per_seed = d.mean(0), d.mean(1)
    var_scenes = float(per_scene.var(ddof=1) / len(per_scene))
    var_seeds = float(per_seed.var(ddof=1) / len(per_seed))
    df = satterthwaite_df([(var_scenes, len(per_scene) - 1), (var_seeds, len(per_seed) - 1)])
    se = math.sqrt(var_scenes + var_seeds)
    critical = float(student_t.ppf(1 - alpha / 2, df))
    return {
        "a": float(x.mean()),
        "b": float(y.mean()),
        "diff": float(d.mean()),
        "se_scenes": math.sqrt(var_scenes),
        "se_seeds": math.sqrt(var_seeds),
        "se": se,
        "df": df,
        "critical": critical,
        "mde": (critical + float(student_t.ppf(power, df))) * se,
        "seeds": int(x.shape[0]),
        "scenes": int(x.shape[1]),
    }


def mean_pair_overlap(result, pairs: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """1 - cos(theta_1) between the mined subspaces of label pairs (all pairs when None), averaged
    over layers and pairs, for column ("col") and row ("row") spaces (mine.MiningResult.overlaps)."""
    cols, rows = [], []
    for per_pair in result.overlaps.values():
        for pair, values in per_pair.items():
            a, b = pair.split("|")
            if pairs is None or (a, b) in pairs or (b, a) in pairs:
                cols.append(values["col_score"])
                rows.append(values["row_score"])
    if not cols:
        raise ValueError(f"no overlap of the pairs {pairs}")
    return {"col": float(np.mean(cols)), "row": float(np.mean(rows))}


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("no values")
    return float(statistics.median(values))
