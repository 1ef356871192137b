"""LoRA factors in peft's on-disk layout."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import attrspace.export.peft_folder as peft_io
import attrspace.util.folders as folders
from attrspace import (
    AdapterFileError,
    inject_lora,
    load_peft,
    load_peft_into,
    lora_state,
    save_peft,
)
from attrspace.models.vit import ADAPTED, TinyViT


def trained_lora_model(seed=0):
    torch.manual_seed(seed)
    model = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    inject_lora(model, ADAPTED, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def test_round_trip_through_a_fresh_model(tmp_path):
    model = trained_lora_model()
    save_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny-vit")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert len(config["target_modules"]) == 8
    factors = load_peft(tmp_path / "adapter")
    assert set(factors) == set(lora_state(model))
    assert (
        factors["blocks.0.attn.qkv"].A.shape == (4, 32)
        and factors["blocks.0.attn.qkv"].scale == 2.0
    )
    fresh = trained_lora_model(seed=1)
    load_peft_into(fresh, factors)
    x = torch.randn(2, 5, 12)
    # Same base weights (seed 0 vs 1 differ), so compare the adapter parts only.
    for name, f in factors.items():
        got = fresh.get_submodule(name)
        assert torch.equal(got.lora_A.weight, f.A) and torch.equal(got.lora_B.weight, f.B)
    assert fresh(x).shape == (2, 5, 12)


def test_factor_form(tmp_path):
    model = trained_lora_model()
    layer = model.get_submodule("blocks.1.mlp.fc1")
    f = lora_state(model)["blocks.1.mlp.fc1"]
    P, Q = f.left_right()
    torch.testing.assert_close(P @ Q.t(), layer.delta_weight())


def write_adapter(folder, tensors, **config):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
    base.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(base))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_reads_peft_variants(tmp_path):
    tensors = {
        "base_model.model.enc.q.lora_A.weight": torch.randn(2, 6),
        "base_model.model.enc.q.lora_B.weight": torch.randn(5, 2),
        "base_model.model.enc.k.lora_A.weight": torch.randn(3, 6),
        "base_model.model.enc.k.lora_B.weight": torch.randn(5, 3),
        "base_model.model.head.conv.lora_A.weight": torch.randn(2, 4, 3, 3),
        "base_model.model.head.conv.lora_B.weight": torch.randn(7, 2, 1, 1),
    }
    targets = ["q", "k", "conv"]
    write_adapter(
        tmp_path / "a",
        tensors,
        target_modules=targets,
        rank_pattern={"k": 3},
        alpha_pattern={"k": 12},
    )
    factors = load_peft(tmp_path / "a")
    assert factors["enc.q"].scale == 2.0 and factors["enc.k"].scale == 4.0
    assert factors["head.conv"].left_right()[0].shape == (7, 2)
    write_adapter(
        tmp_path / "b", tensors, target_modules=targets, rank_pattern={"k": 3}, use_rslora=True
    )
    assert load_peft(tmp_path / "b")["enc.q"].scale == pytest.approx(4 / 2**0.5)  # alpha / sqrt(r)


@pytest.mark.parametrize(
    ("tensors", "config", "message"),
    [
        (
            {"base_model.model.q.lora_A.weight": torch.randn(2, 6)},
            {},
            r"layer q: has only lora_\['A'\]",
        ),
        (
            {
                "base_model.model.q.lora_A.weight": torch.randn(3, 6),
                "base_model.model.q.lora_B.weight": torch.randn(5, 3),
            },
            {},
            "do not fit rank 2",
        ),
        (
            {
                "base_model.model.q.lora_A.weight": torch.full((2, 6), float("inf")),
                "base_model.model.q.lora_B.weight": torch.randn(5, 2),
            },
            {},
            "NaN or Inf",
        ),
        ({"base_model.model.q.weight": torch.randn(2, 6)}, {}, "not a LoRA A/B weight"),
        (
            {
                "base_model.model.q.lora_A.weight": torch.randn(2, 6),
                "base_model.model.q.lora_B.weight": torch.randn(5, 2),
            },
            {"peft_type": "IA3"},
            "expected 'LORA'",
        ),
    ],
    ids=["missing-B", "rank", "inf", "stray-key", "not-lora"],
)
def test_bad_adapters(tmp_path, tensors, config, message):
    write_adapter(tmp_path / "x", tensors, **config)
    with pytest.raises(AdapterFileError, match=message):
        load_peft(tmp_path / "x")


def test_missing_files(tmp_path):
    with pytest.raises(AdapterFileError, match="cannot read the adapter config"):
        load_peft(tmp_path)


QK = {
    "base_model.model.enc.q.lora_A.weight": torch.randn(2, 6),
    "base_model.model.enc.q.lora_B.weight": torch.randn(5, 2),
    "base_model.model.enc.k.lora_A.weight": torch.randn(2, 6),
    "base_model.model.enc.k.lora_B.weight": torch.randn(5, 2),
}


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["q"], r"weights of modules not in target_modules \['enc.k'\], target_modules without"),
        (["q", "k", "v"], r"target_modules without weights \['v'\]"),
        ("enc\\.q", r"not in target_modules \['enc.k'\]"),
        (None, "target_modules must be a regex or a non-empty list"),
        ([], "target_modules must be a regex or a non-empty list"),
    ],
    ids=["weights-not-targeted", "target-without-weights", "regex", "none", "empty"],
)
def test_config_and_weights_must_name_the_same_modules(tmp_path, targets, message):
    write_adapter(tmp_path, QK, target_modules=targets)
    with pytest.raises(AdapterFileError, match=message):
        load_peft(tmp_path)


def test_rank_disagreements_are_all_listed(tmp_path):
    write_adapter(tmp_path, QK, target_modules=["q", "k"], r=3)
    with pytest.raises(
        AdapterFileError, match=r"disagree on ranks:\n  layer enc.k.*\n  layer enc.q"
    ):
        load_peft(tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lora_alpha": float("nan")}, "lora_alpha .* must be finite and > 0, got nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha .* must be finite and > 0, got inf"),
        ({"lora_alpha": 0}, "lora_alpha .* must be finite and > 0"),
        ({"lora_alpha": -4}, "lora_alpha .* must be finite and > 0"),
        ({"lora_alpha": "4"}, "lora_alpha .* must be a real number"),
        ({"r": 2.5}, "r .* must be an integer"),
        ({"r": 0}, "r .* must be >= 1"),
        ({"alpha_pattern": {"k": float("nan")}}, r"alpha_pattern\['k'\] .* must be finite"),
        ({"rank_pattern": {"k": -1}}, r"rank_pattern\['k'\] .* must be >= 1"),
        ({"use_rslora": "yes"}, "use_rslora .* must be true or false"),
    ],
    ids=[
        "alpha-nan",
        "alpha-inf",
        "alpha-zero",
        "alpha-negative",
        "alpha-str",
        "r-float",
        "r-zero",
        "alpha-pattern-nan",
        "rank-pattern-negative",
        "rslora-str",
    ],
)
def test_bad_config_values(tmp_path, config, message):
    write_adapter(tmp_path, QK, **({"target_modules": ["q", "k"]} | config))
    with pytest.raises(AdapterFileError, match=message):
        load_peft(tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[1, 2]", "must be a JSON object, got a list"),
        (b'{"peft_type": "LORA", "r": 2, \xff}', "not UTF-8 text"),
        (b"{peft_type: LORA", "not JSON"),
    ],
    ids=["list", "not-utf8", "not-json"],
)
def test_unreadable_configs_name_the_path(tmp_path, data, message):
    write_adapter(tmp_path, QK, target_modules=["q", "k"])
    (tmp_path / "adapter_config.json").write_bytes(data)
    with pytest.raises(AdapterFileError, match=f"adapter_config.json: .*{message}"):
        load_peft(tmp_path)


def test_mixed_ranks_go_into_rank_and_alpha_patterns(tmp_path):
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    inject_lora(model, ["attn.qkv", "attn.proj"], rank=4, alpha=8)
    inject_lora(model, ["blocks.1.mlp.fc1"], rank=2, alpha=3)
    save_peft(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"^blocks\\.1\\.mlp\\.fc1": 2}
    assert config["alpha_pattern"] == {"^blocks\\.1\\.mlp\\.fc1": 3}
    factors = load_peft(tmp_path / "a")
    assert factors["blocks.1.mlp.fc1"].scale == 1.5 and factors["blocks.0.attn.qkv"].scale == 2.0
    assert set(factors) == set(lora_state(model))


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_replaces_a_folder_in_one_step(tmp_path):
    first, second = trained_lora_model(0), trained_lora_model(1)
    folder = tmp_path / "adapter"
    save_peft(first, folder)
    (folder / "README.md").write_text("model card")
    save_peft(second, folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.blocks.0.attn.qkv.lora_B.weight"
    assert torch.equal(weights[key], second.blocks[0].attn.qkv.lora_B.weight)
    assert (folder / "README.md").read_text() == "model card"
    assert _visible(tmp_path) == ["adapter"]  # no temporary or old folder left


def _visible(parent):
    """The names in `parent` but the lock file that stays beside a written folder."""
    return sorted(n for n in os.listdir(parent) if not n.endswith((".lock", ".lock.owner")))


@pytest.mark.parametrize("fault", ["verify", "rename"])
def test_failed_save_leaves_the_old_folder_untouched(tmp_path, monkeypatch, fault):
    folder = tmp_path / "adapter"
    save_peft(trained_lora_model(0), folder)
    before = _snapshot(folder)
    if fault == "verify":  # both new files written, then the read-back fails
        monkeypatch.setattr(peft_io, "load_peft", lambda _: (_ for _ in ()).throw(OSError("disk")))
    else:  # no exchange here: the old folder was set aside, then moving the new one in fails
        real = os.rename
        calls = []

        def rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("rename failed")
            return real(src, dst)

        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
        monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(OSError, match=r"disk|rename failed"):
        save_peft(trained_lora_model(1), folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert _visible(tmp_path) == ["adapter"]


def test_save_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not part of an adapter \(\['notes"):
        save_peft(trained_lora_model(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        save_peft(trained_lora_model(), tmp_path / "file")


def test_files_written_by_peft_itself_load(tmp_path):
    """The layout check against the real peft package (a test dependency)."""
    peft = pytest.importorskip("peft", reason="peft is an optional dependency; CI installs it")
    torch.manual_seed(0)
    base = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=True
    )
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    x = torch.randn(2, 5, 12)
    expected = peft_model(x)
    peft_model.save_pretrained(str(tmp_path))
    factors = load_peft(tmp_path)
    assert set(factors) == {f"blocks.{i}.{n}" for i in range(2) for n in ADAPTED}
    torch.manual_seed(0)
    ours = TinyViT(dim=32, depth=2, heads=2, in_dim=12)
    inject_lora(ours, ADAPTED, rank=4, alpha=8)
    load_peft_into(ours, factors)
    torch.testing.assert_close(ours(x), expected)


# -- configs that would hang or crash a reader ----------------------------------------------------

LONG = "a" * 80  # a module name on which (a|aa)+b backtracks ~fib(80) times


def _one_layer(name: str) -> dict:
    return {
        f"base_model.model.{name}.lora_A.weight": torch.randn(2, 6),
        f"base_model.model.{name}.lora_B.weight": torch.randn(5, 2),
    }


@pytest.mark.parametrize(
    "config, named",
    [
        ({"target_modules": "blocks.(q"}, "target_modules"),
        ({"target_modules": ["q"], "rank_pattern": {"q[": 3}}, r"rank_pattern\['q\['\]"),
        ({"target_modules": ["q"], "alpha_pattern": {"(?P<": 2}}, r"alpha_pattern\['\(\?P<'\]"),
        ({"target_modules": ["q"], "rank_pattern": {"q)(x": 3}}, r"rank_pattern\['q\)\(x'\]"),
    ],
    ids=["target", "rank", "alpha", "breaks-peft's-wrapper"],
)
def test_an_invalid_regex_is_named_with_its_key(tmp_path, config, named):
    write_adapter(tmp_path, _one_layer("enc.q"), **config)
    with pytest.raises(AdapterFileError, match=rf"{named} is not a valid regular expression"):
        load_peft(tmp_path)


@pytest.mark.parametrize("where", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_a_catastrophically_backtracking_regex_ends_in_an_error(tmp_path, where):
    # re.fullmatch("(a|aa)+b", "a" * 80) would run for ages: the reader hung here.
    pattern = "(a|aa)+b"
    config = {"target_modules": pattern} if where == "target_modules" else {
        "target_modules": [LONG], where: {pattern: 3}
    }  # fmt: skip
    write_adapter(tmp_path, _one_layer(LONG), **config)
    with pytest.raises(AdapterFileError, match=rf"{where}.* did not finish matching"):
        load_peft(tmp_path)


def test_nested_quantifiers_that_regex_can_match_give_the_right_answer(tmp_path):
    # (a+)+b backtracks exponentially in `re`; here it is simply not a match.
    write_adapter(tmp_path, _one_layer(LONG), target_modules="(a+)+b")
    with pytest.raises(AdapterFileError, match=r"not in target_modules \['a{80}'\]"):
        load_peft(tmp_path)
    write_adapter(tmp_path, _one_layer(LONG), target_modules="(a+)+", rank_pattern={"(a+)+b": 3})
    assert load_peft(tmp_path)[LONG].rank == 2


@pytest.mark.parametrize("fault", ["fifo", "deep", "huge"])
def test_a_config_that_is_no_small_json_file_is_named(tmp_path, fault):
    write_adapter(tmp_path, _one_layer("enc.q"))
    config = tmp_path / "adapter_config.json"
    config.unlink()
    if fault == "fifo":  # blocked the reader forever, then was reported as "not found"
        os.mkfifo(config)
    elif fault == "deep":  # a raw RecursionError
        config.write_text("[" * 100_000 + "]" * 100_000)
    else:
        config.write_text('{"r": 2, "pad": "' + " " * (1 << 20) + '"}')
    words = {"fifo": "is a FIFO", "deep": "JSON nested too deep", "huge": "more than"}
    with pytest.raises(AdapterFileError, match=rf"adapter_config.json: .*{words[fault]}"):
        load_peft(tmp_path)


def test_weights_that_are_a_fifo_are_named(tmp_path):
    write_adapter(tmp_path, _one_layer("enc.q"))
    (tmp_path / "adapter_model.safetensors").unlink()
    os.mkfifo(tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors: is a FIFO"):
        load_peft(tmp_path)


def test_a_nan_lora_is_named_by_layer_and_nothing_is_written(tmp_path):
    model = trained_lora_model()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^layer blocks.1.mlp.fc1: lora_B holds NaN") as caught:
        save_peft(model, tmp_path / "adapter")
    assert ".tmp" not in str(caught.value)  # the temporary folder it once named is gone
    assert not (tmp_path / "adapter").exists()


def test_a_full_disk_names_the_file_of_the_destination(tmp_path, monkeypatch):
    save_peft(trained_lora_model(0), tmp_path / "adapter")
    before = _snapshot(tmp_path / "adapter")

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() reports it: no path

    monkeypatch.setattr(type(tmp_path), "write_bytes", full)
    with pytest.raises(OSError) as caught:
        save_peft(trained_lora_model(1), tmp_path / "adapter")
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "adapter" / "adapter_model.safetensors")
    assert _snapshot(tmp_path / "adapter") == before and _visible(tmp_path) == ["adapter"]
