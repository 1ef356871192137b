"""Mining: IRLS consensus, rank rules, disentanglement, integration into a bank."""

import pytest
import torch

from attrspace import SubspaceBank, inject
from attrspace.linalg import principal_cosines
from attrspace.mining.subspaces import MiningConfig, choose_rank, mine, updates_from_peft

ATTRS = ["texture", "geometry", "camera", "lighting"]


def orth(rows, cols, g):
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def planted_updates(m=48, n=40, d=3, r=4, k=6, outlier=True, shared=None, seed=0):
    """Per attribute a planted rank-d consensus U C V^T; each LoRA = consensus + small rank-1 noise;
    LoRA #0 of every attribute optionally replaced by a large unrelated update."""
    g = torch.Generator().manual_seed(seed)
    planted, updates = {}, {}
    for a in ATTRS:
        U, V = orth(m, d, g), orth(n, d, g)
        if shared is not None and a in ("texture", "geometry"):
            U = torch.cat([shared[0], U[:, 1:]], 1)
            V = torch.cat([shared[1], V[:, 1:]], 1)
        core = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)[:d])
        layer = []
        for i in range(k):
            P = torch.cat(
                [
                    U @ (core + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)),
                    0.01 * torch.randn(m, r - d, generator=g, dtype=torch.float64),
                ],
                1,
            )
            Q = torch.cat([V, torch.randn(n, r - d, generator=g, dtype=torch.float64)], 1)
            if outlier and i == 0:
                P = 2.0 * torch.randn(m, r, generator=g, dtype=torch.float64)
                Q = torch.randn(n, r, generator=g, dtype=torch.float64)
            layer.append((P.float(), Q.float()))
        planted[a] = (U, V)
        updates[a] = {"blocks.0.attn.qkv": layer, "blocks.1.mlp.fc2": [(q, p) for p, q in layer]}
    return planted, updates


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_robust_consensus_recovers_planted_subspaces(svd):
    planted, updates = planted_updates()
    result = mine(updates, MiningConfig(p=1.0, rank_cap=8, svd=svd, backend="torch"))
    for a in ATTRS:
        assert result.ranks["blocks.0.attn.qkv"][a] == 3
        w = result.weights["blocks.0.attn.qkv"][a]
        assert w[0] < 0.05 * w[1:].min(), w  # the outlier LoRA is down-weighted
        U, _, V = result.bases["blocks.0.attn.qkv"][a]
        assert principal_cosines(U, planted[a][0]).min() > 0.999
        assert principal_cosines(V, planted[a][1]).min() > 0.999
        # The transposed layer (fc2 holds Q P^T): the roles of the bases swap.
        _Ut, _, Vt = result.bases["blocks.1.mlp.fc2"][a]
        assert principal_cosines(Vt, planted[a][0]).min() > 0.999
        # The integrated bank spans every attribute's subspace.
        bank_u = result.bank.layers["blocks.0.attn.qkv"].U.double()
        assert principal_cosines(planted[a][0], bank_u).min() > 0.999


def test_least_squares_is_pulled_by_the_outlier():
    planted, updates = planted_updates()
    robust = mine(updates, MiningConfig(p=1.0, rank=3, backend="torch"))
    plain = mine(updates, MiningConfig(p=2.0, rank=3, backend="torch"))
    assert plain.iterations == 1

    def worst(result):
        bases = result.bases["blocks.0.attn.qkv"]
        return min(float(principal_cosines(bases[a][0], planted[a][0]).min()) for a in ATTRS)

    assert worst(robust) > 0.999 > worst(plain)


def test_overlaps_detect_a_shared_direction():
    g = torch.Generator().manual_seed(5)
    shared = (orth(48, 1, g), orth(40, 1, g))
    _, updates = planted_updates(outlier=False, shared=shared, seed=1)
    result = mine(updates, MiningConfig(rank=3, backend="torch"))
    pairs = result.overlaps["blocks.0.attn.qkv"]
    assert pairs["texture|geometry"]["col_score"] < 1e-3  # a shared direction: score near 0
    assert pairs["camera|lighting"]["col_score"] > 0.3  # random 3-D subspaces of R^48: far apart
    assert len(pairs) == 6 and len(pairs["camera|lighting"]["row_cosines"]) == 3
    # Integration drops the shared direction the second time it appears.
    assert result.dropped["blocks.0.attn.qkv"] == 1
    layer = result.bank.layers["blocks.0.attn.qkv"]
    assert layer.rank == 11
    torch.testing.assert_close(layer.U.t() @ layer.U, torch.eye(11), atol=1e-5, rtol=0)


def test_concatenation_without_orthonormalisation_keeps_scaling():
    _, updates = planted_updates(outlier=False)
    result = mine(
        updates, MiningConfig(rank=3, orthonormalize=False, keep_sqrt_s=True, backend="torch")
    )
    layer = result.bank.layers["blocks.0.attn.qkv"]
    assert layer.rank == 12 and not result.bank.orthonormal
    norms = layer.U.norm(dim=0)
    torch.testing.assert_close(norms, layer.singular_values.sqrt(), rtol=1e-4, atol=1e-6)


def test_rank_rules():
    s = torch.tensor([10.0, 9.0, 8.0, 0.1, 0.09, 0.08, 0.0])
    assert choose_rank(s, MiningConfig(rank="cliff", rank_cap=5)) == 3
    assert choose_rank(s, MiningConfig(rank=5)) == 5
    assert choose_rank(s, MiningConfig(rank="energy", energy=0.5)) == 2
    assert choose_rank(s, MiningConfig(rank="cliff", rank_floor=4, rank_cap=6)) == 6  # drop to zero
    with pytest.raises(ValueError, match="rank must be"):
        MiningConfig(rank="knee")
    with pytest.raises(ValueError, match="p must be"):
        MiningConfig(p=3.0)


def test_bad_updates_are_named():
    _, updates = planted_updates(k=2)
    updates["camera"]["blocks.0.attn.qkv"][1] = (
        torch.full((48, 4), float("nan")),
        torch.zeros(40, 4),
    )
    with pytest.raises(ValueError, match=r"layer blocks.0.attn.qkv, camera #1: factors hold NaN"):
        mine(updates, MiningConfig(backend="torch"))


def test_mined_bank_round_trips_and_injects(tmp_path):
    from attrspace import inject_lora, save_peft
    from attrspace.models.vit import ADAPTED, TinyViT

    torch.manual_seed(0)
    folders = {}
    for a in ATTRS[:2]:
        folders[a] = []
        for i in range(3):
            model = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
            inject_lora(model, ADAPTED, rank=4, alpha=8)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.05)
            save_peft(model, tmp_path / f"{a}{i}")
            folders[a].append(tmp_path / f"{a}{i}")
    updates = updates_from_peft(folders)
    result = mine(updates, MiningConfig(rank=2, backend="torch"))
    result.bank.save(tmp_path / "bank.safetensors")
    bank = SubspaceBank.load(tmp_path / "bank.safetensors")
    assert bank.attributes == ("texture", "geometry") and len(bank.layers) == 8
    model = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    report = inject(model, bank)
    assert report.trainable_params == sum(layer.rank**2 for layer in bank.layers.values())
