"""Mining attribute subspaces from LoRA updates (docs/design.md §1, steps 3-5; §7).

For every adapted layer and attribute, with the attribute's k updates dW_i = P_i Q_i^T (P_i = s B_i,
Q_i = A_i^T), find the robust rank-d consensus

    minimise over U (m x d), V (n x d):  sum_i || U V^T - dW_i ||_F^p ,  p < 2

by IRLS: C = sum w_i dW_i / sum w_i = Ptilde Qtilde^T in factor form (never m x n); truncated SVD
C ~ Ubar S Vbar^T; U V^T = Ubar S Vbar^T; w_i = (eps^2 + ||U V^T - dW_i||_F^2)^(-(2 - p) / 2), with the
residuals from Gram traces. One batched randomized SVD per iteration covers every (layer, attribute).
Then: the rank d per layer and attribute from the spectrum of C; disentanglement as principal cosines
between attributes' column (and row) spaces; integration into one bank of K = sum d_a columns per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attrspace.bank import LayerSubspace, SubspaceBank
from attrspace.export.peft_folder import load_peft
from attrspace.linalg import factor_svd, factored_sq_distance, principal_cosines
from attrspace.linalg.randomized import randomized_svd

Factors = tuple[Tensor, Tensor]  # (P (m, r), Q (n, r)): update P Q^T


@dataclass(frozen=True)
class MiningConfig:
    """Settings of the mining step (defaults in brackets).

    p [1.0]: exponent of the robust objective (2 = least squares, smaller down-weights outlier LoRAs).
    eps_rel [1e-3]: IRLS smoothing eps, relative to the median residual norm of the first iteration.
    max_iters [20], tol [1e-4]: IRLS stops when no weight changes by more than tol (relative to the sum).
    rank ["cliff"]: an int (fixed d), "cliff" (largest drop of the log spectrum between positions
        rank_floor and rank_cap) or "energy" (smallest d keeping `energy` of ||C||_F^2, capped).
    svd ["randomized"]: "randomized" (batched HMT, `oversample`, `power_iters`, `backend`) or "exact"
        (thin QRs of the factors + a small SVD).
    spectrum [32]: singular values kept per (layer, attribute) for the rank rule and the plots.
    orthonormalize [True]: orthonormalise the concatenated bases attribute by attribute, dropping
        directions already spanned (sine of the principal angle to the basis so far < drop_tol [0.05]);
        else concatenate as mined, with
        U_a = Ubar_a S^(1/2), V_a = Vbar_a S^(1/2) when keep_sqrt_s, or the orthonormal Ubar_a, Vbar_a.
    scale [2.0]: the adapter scale s stored in the bank (the paper's s = lora_alpha / r = 2).
    """

    p: float = 1.0
    eps_rel: float = 1e-3
    max_iters: int = 20
    tol: float = 1e-4
    rank: int | str = "cliff"
    rank_floor: int = 1
    rank_cap: int = 16
    energy: float = 0.9
    svd: str = "randomized"
    oversample: int = 8
    power_iters: int = 2
    backend: str = "auto"
    spectrum: int = 32
    orthonormalize: bool = True
    keep_sqrt_s: bool = False
    drop_tol: float = 0.05
    scale: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.p <= 2:
            raise ValueError(f"p must be in (0, 2], got {self.p}")
        if isinstance(self.rank, str) and self.rank not in ("cliff", "energy"):
            raise ValueError(f"rank must be an int, 'cliff' or 'energy', got {self.rank!r}")
        if isinstance(self.rank, int) and self.rank < 1:
            raise ValueError(f"a fixed rank must be >= 1, got {self.rank}")
        if not 1 <= self.rank_floor <= self.rank_cap:
            raise ValueError(
                f"need 1 <= rank_floor <= rank_cap, got {self.rank_floor}, {self.rank_cap}"
            )
        if self.svd not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', got {self.svd!r}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")


@dataclass
class MiningResult:
    """The bank and the evidence: spectra, ranks, IRLS weights and pairwise overlaps per layer."""

    bank: SubspaceBank
    spectra: dict[str, dict[str, Tensor]]
    ranks: dict[str, dict[str, int]]
    weights: dict[str, dict[str, Tensor]]
    overlaps: dict[str, dict[str, dict[str, list[float]]]]
    iterations: int
    dropped: dict[str, int] = field(default_factory=dict)
    # Per layer and attribute the mined (Ubar (m, d), S (d,), Vbar (n, d)) before integration.
    bases: dict[str, dict[str, tuple[Tensor, Tensor, Tensor]]] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready numbers: per layer ranks, spectra, overlap cosines and scores."""
        return {
            "iterations": self.iterations,
            "layers": {
                name: {
                    "ranks": self.ranks[name],
                    "spectra": {a: s.tolist() for a, s in self.spectra[name].items()},
                    "weights": {a: w.tolist() for a, w in self.weights[name].items()},
                    "overlaps": self.overlaps[name],
                    "dropped": self.dropped.get(name, 0),
                }
                for name in self.ranks
            },
        }


def choose_rank(spectrum: Tensor, config: MiningConfig, total_energy: float | None = None) -> int:
    """d from a descending spectrum by the configured rule (fixed, cliff or energy), at least 1."""
    available = int((spectrum > 0).sum())
    if available == 0:
        return 1
    if isinstance(config.rank, int):
        return min(config.rank, available)
    cap = min(config.rank_cap, available)
    floor = min(config.rank_floor, cap)
    if config.rank == "energy":
        energy = spectrum.double().pow(2).cumsum(0)
        total = total_energy if total_energy is not None else float(energy[-1])
        reached = (energy >= config.energy * total).nonzero()
        d = int(reached[0]) + 1 if len(reached) else cap
        return max(floor, min(d, cap))
    # cliff: keep d values where log s_d - log s_{d+1} is largest; beyond the numerical rank the drop is
    # to "zero", which counts as the largest cliff.
    logs = spectrum.double().clamp_min(spectrum.max().double() * 1e-12).log()
    gaps = logs[:-1] - logs[1:]  # gaps[d-1] = drop after the d-th value
    if len(gaps) == 0:
        return 1
    window = gaps[floor - 1 : cap]
    return floor + int(window.argmax())


def _svd_many(
    ops: list[Factors], ranks: list[int], config: MiningConfig, generator
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Truncated SVDs of factored operators, op i to ranks[i] values; one batched call per distinct rank."""
    if config.svd == "exact":
        return [factor_svd(p, q, r) for (p, q), r in zip(ops, ranks, strict=False)]
    out: list = [None] * len(ops)
    for rank in sorted(set(ranks)):
        idx = [i for i, r in enumerate(ranks) if r == rank]
        part = randomized_svd(
            [ops[i] for i in idx],
            rank,
            oversample=config.oversample,
            power_iters=config.power_iters,
            backend=config.backend,
            generator=generator,
        )
        for i, res in zip(idx, part, strict=False):
            out[i] = res
    return out


def _weighted_factors(updates: list[Factors], w: Tensor) -> Factors:
    """C = sum_i w_i P_i Q_i^T / sum w as one factor pair (m, k r), (n, k r)."""
    w = w / w.sum()
    P = torch.cat([wi * p for wi, (p, _) in zip(w, updates, strict=False)], dim=1)
    Q = torch.cat([q for _, q in updates], dim=1)
    return P, Q


def _check_updates(updates: dict[str, dict[str, list[Factors]]]) -> list[str]:
    if not updates:
        raise ValueError("no attributes given")
    layer_sets = [set(layers) for layers in updates.values()]
    common = sorted(set.intersection(*layer_sets))
    if not common:
        raise ValueError("the attributes share no adapted layer")
    for name in common:
        shapes = set()
        for attribute, layers in updates.items():
            if not layers[name]:
                raise ValueError(f"layer {name}: attribute {attribute!r} has no updates")
            for i, (p, q) in enumerate(layers[name]):
                if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
                    raise ValueError(
                        f"layer {name}, {attribute} #{i}: P {tuple(p.shape)} and Q {tuple(q.shape)} are not factors"
                    )
                if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
                    raise ValueError(f"layer {name}, {attribute} #{i}: factors hold NaN or Inf")
                shapes.add((p.shape[0], q.shape[0]))
        if len(shapes) != 1:
            raise ValueError(f"layer {name}: updates disagree on (d_out, d_in): {sorted(shapes)}")
    return common


def _spectrum_lengths(stacks: dict, config: MiningConfig) -> dict:
    """Singular values to compute per (layer, attribute): at most the stacked rank and the shape."""
    return {
        key: min(
            config.spectrum,
            sum(p.shape[1] for p, _ in stack),
            stack[0][0].shape[0],
            stack[0][1].shape[0],
        )
        for key, stack in stacks.items()
    }


def _irls(stacks: dict, config: MiningConfig, generator: torch.Generator) -> tuple[dict, int]:
    """IRLS weights per (layer, attribute) after convergence (or max_iters), and the iterations run:
    w_i = (eps^2 + ||U V^T - dW_i||^2)^(-(2 - p) / 2), normalised to sum 1 (docs/design.md §1)."""
    keys = list(stacks)
    spec_len = _spectrum_lengths(stacks, config)
    weights = {key: torch.ones(len(stacks[key]), dtype=torch.float64) for key in keys}
    eps2: dict = {}
    iterations = 0
    for it in range(config.max_iters):
        iterations = it + 1
        ops = [_weighted_factors(stacks[key], weights[key]) for key in keys]
        svds = _svd_many(ops, [spec_len[key] for key in keys], config, generator)
        changed = 0.0
        for key, (u, s, v) in zip(keys, svds, strict=True):
            d = choose_rank(s, config)
            root = s[:d].sqrt()
            P = torch.stack([p for p, _ in stacks[key]])
            Q = torch.stack([q for _, q in stacks[key]])
            res2 = factored_sq_distance(u[:, :d] * root, v[:, :d] * root, P, Q)
            if key not in eps2:
                eps2[key] = (config.eps_rel * float(res2.sqrt().median())) ** 2 + 1e-300
            new = (eps2[key] + res2).pow(-(2.0 - config.p) / 2.0)
            new = new / new.sum()
            changed = max(changed, float((new - weights[key] / weights[key].sum()).abs().max()))
            weights[key] = new
        if config.p == 2.0 or changed < config.tol:
            break
    return weights, iterations


def _final_bases(stacks: dict, weights: dict, config: MiningConfig, generator: torch.Generator):
    """The decomposition with the converged weights: spectra, ranks and truncated bases per layer
    and attribute."""
    keys = list(stacks)
    spec_len = _spectrum_lengths(stacks, config)
    ops = [_weighted_factors(stacks[key], weights[key]) for key in keys]
    svds = _svd_many(ops, [spec_len[key] for key in keys], config, generator)
    spectra, ranks, bases = {}, {}, {}
    for (name, a), (u, s, v), op in zip(keys, svds, ops, strict=True):
        total = float(factored_sq_norm_pair(*op))
        d = choose_rank(s, config, total_energy=total)
        spectra.setdefault(name, {})[a] = s.float()
        ranks.setdefault(name, {})[a] = d
        bases.setdefault(name, {})[a] = (u[:, :d], s[:d], v[:, :d])
    return spectra, ranks, bases


def mine(
    updates: dict[str, dict[str, list[Factors]]], config: MiningConfig = MiningConfig()
) -> MiningResult:
    """Mine a SubspaceBank from LoRA updates.

    updates: attribute -> layer name -> list of (P (d_out, r), Q (d_in, r)) with update P Q^T (scale
    included, e.g. `LoRAFactors.left_right()`). Layers present for every attribute are mined.
    """
    layers = _check_updates(updates)
    attributes = list(updates)
    stacks = {
        (name, a): [(p.double(), q.double()) for p, q in updates[a][name]]
        for name in layers
        for a in attributes
    }
    generator = torch.Generator().manual_seed(config.seed)
    weights, iterations = _irls(stacks, config, generator)
    spectra, ranks, bases = _final_bases(stacks, weights, config, generator)
    overlaps = {name: _overlaps(bases[name]) for name in layers}
    bank_layers, dropped = {}, {}
    for name in layers:
        bank_layers[name], dropped[name] = _integrate(bases[name], attributes, config)
    bank = SubspaceBank(
        bank_layers,
        attributes=tuple(attributes),
        model_config="mined",
        scale=config.scale,
        orthonormal=config.orthonormalize,
        extra={
            "p": config.p,
            "rank_rule": str(config.rank),
            "svd": config.svd,
            "iterations": iterations,
        },
    )
    weights_out: dict[str, dict[str, Tensor]] = {n: {} for n in layers}
    for (name, a), w in weights.items():
        weights_out[name][a] = w.float()
    return MiningResult(bank, spectra, ranks, weights_out, overlaps, iterations, dropped, bases)


def factored_sq_norm_pair(P: Tensor, Q: Tensor) -> Tensor:
    """||P Q^T||_F^2 by Gram traces."""
    return ((P.t() @ P) * (Q.t() @ Q)).sum()


def _overlaps(bases: dict[str, tuple[Tensor, Tensor, Tensor]]) -> dict[str, dict[str, list[float]]]:
    """Per attribute pair: principal cosines of the column and row spaces, and 1 - cos(theta_1)."""
    out = {}
    names = list(bases)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            col = principal_cosines(bases[a][0], bases[b][0], orthonormal=True)
            row = principal_cosines(bases[a][2], bases[b][2], orthonormal=True)
            out[f"{a}|{b}"] = {
                "col_cosines": col.tolist(),
                "row_cosines": row.tolist(),
                "col_score": 1.0 - float(col[0]),
                "row_score": 1.0 - float(row[0]),
            }
    return out


def _integrate(
    bases: dict[str, tuple[Tensor, Tensor, Tensor]], attributes: list[str], config: MiningConfig
) -> tuple[LayerSubspace, int]:
    """Concatenate the attributes' bases into one layer entry; returns it and the number of columns dropped."""
    us, vs, svals, owner = [], [], [], []
    for index, a in enumerate(attributes):
        u, s, v = bases[a]
        if not config.orthonormalize and config.keep_sqrt_s:
            u, v = u * s.sqrt(), v * s.sqrt()
        us.append(u)
        vs.append(v)
        svals.append(s)
        owner += [index] * u.shape[1]
    U, V, S = torch.cat(us, 1), torch.cat(vs, 1), torch.cat(svals)
    if not config.orthonormalize:
        owner_t = torch.tensor(owner, dtype=torch.int64)
        return LayerSubspace(U.float().contiguous(), V.float().contiguous(), owner_t, S.float()), 0
    # Attribute by attribute, keep the part of its block not yet spanned: the residual of the block
    # against the basis so far has singular values sin(theta) of the principal angles, so directions
    # with sin(theta) < drop_tol are already there. Column and row sides keep the same count (M is
    # K x K); counting and rotating within a block is safe because M mixes columns freely anyway.
    qu = U.new_zeros(U.shape[0], 0)
    qv = V.new_zeros(V.shape[0], 0)
    owners, values = [], []
    for index, (u, v, s) in enumerate(zip(us, vs, svals, strict=False)):
        ru, rv = u, v
        for _ in range(2):  # project twice: enough for orthogonality to working precision
            ru = ru - qu @ (qu.t() @ ru)
            rv = rv - qv @ (qv.t() @ rv)
        lu, su, _ = torch.linalg.svd(ru, full_matrices=False)
        lv, sv, _ = torch.linalg.svd(rv, full_matrices=False)
        keep = min(int((su > config.drop_tol).sum()), int((sv > config.drop_tol).sum()))
        qu = torch.cat([qu, lu[:, :keep]], 1)
        qv = torch.cat([qv, lv[:, :keep]], 1)
        owners += [index] * keep
        values.append(s[:keep])
    kept = len(owners)
    layer = LayerSubspace(
        qu.float().contiguous(),
        qv.float().contiguous(),
        torch.tensor(owners, dtype=torch.int64),
        torch.cat(values).float(),
    )
    return layer, U.shape[1] - kept


def updates_from_peft(
    folders: dict[str, list[str | Path]], layers: list[str] | None = None
) -> dict[str, dict[str, list[Factors]]]:
    """Load peft LoRA folders per attribute into the `mine` input (Linear layers only; optional filter)."""
    updates: dict[str, dict[str, list[Factors]]] = {}
    for attribute, paths in folders.items():
        per_layer: dict[str, list[Factors]] = {}
        for path in paths:
            for name, f in load_peft(path).items():
                if f.A.ndim != 2 or (layers is not None and name not in layers):
                    continue
                per_layer.setdefault(name, []).append(f.left_right())
        updates[attribute] = per_layer
    return updates
