"""`attrspace mine --loras DIR --out OUT`: a bank from your own peft LoRAs of any model.

With --loras, `mine` is this standalone command (attrspace.mine_peft): DIR/<attribute>/<lora>/ with
any attribute names, no base model, nothing rendered or pre-trained, no stage cache; OUT receives
the bank, summary.json, the figures and report.md. Without --loras, `mine` is the pipeline stage
(render, pre-train, train the LoRAs, mine, control banks). `finetune --loras` and `run --loras` keep
feeding the pipeline (they need its base model).

attrspace.cli.main imports this module only when `mine --loras` or `--loras` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import replace

import torch

from attrspace.cli.args import UsageError, check_output_folder
from attrspace.mining.peft_input import load_lora_set, lora_folders
from attrspace.mining.subspaces import MiningConfig, mine
from attrspace.pipeline import get_preset
from attrspace.pipeline.mine_loras import prepare_out, write_outputs

# Options of the pipeline's `mine` that mean nothing without a base model.
_PIPELINE_ONLY = (
    ("checkpoint", "--checkpoint"),
    ("device", "--device"),
    ("single_attribute", "--single-attribute"),
)


def mining_config(args: argparse.Namespace):
    """MiningConfig() (or the --preset's mining settings) with --rank, --rank-cap and --seed."""
    config = MiningConfig() if args.preset is None else get_preset(args.preset).mining
    changes = {}
    for field in ("rank", "rank_cap", "seed"):
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    return replace(config, **changes)  # ValueError names the setting that cannot work


def check_mine_loras(args: argparse.Namespace) -> None:
    """Every argument and the whole LoRA folder, before any mining (one-line errors)."""
    for field, flag in _PIPELINE_ONLY:
        if getattr(args, field, None) is not None:
            raise UsageError(f"{flag} has no effect with --loras (mining needs no base model)")
    if not args.loras.is_dir():
        raise UsageError(f"--loras {args.loras}: no such folder")
    check_output_folder(args.out)
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the figures need matplotlib: pip install 'attrspace[plot]'")
    args.mining_config = mining_config(args)
    args.lora_set = load_lora_set(lora_folders(args.loras))
    args.func = mine_loras


def mine_loras(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    data, config = args.lora_set, args.mining_config
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    count = sum(len(p) for p in data.folders.values())
    say(
        f"mine: {len(data.shapes)} layers x {len(data.folders)} attributes "
        f"({', '.join(data.folders)}) from {count} LoRAs"
    )
    if data.skipped:
        say(f"mine: left out {len(data.skipped)} Conv2d LoRA layers ({data.skipped[0]}, ...)")
    out = prepare_out(args.out)
    start = time.perf_counter()
    result = mine(data.updates, config)
    seconds = time.perf_counter() - start
    write_outputs(result, data, config, out, seconds, figures_too=True)
    K = [layer.rank for layer in result.bank.layers.values()]
    say(
        f"mine: {seconds:.1f} s, K per layer {min(K)} to {max(K)}; wrote {out}/bank.safetensors, "
        f"summary.json, figures and report.md"
    )
    return 0


def check_pipeline_loras(loras, attributes: tuple[str, ...]) -> None:
    """`run --loras` / `finetune --loras`: the folder read and checked whole, and its attribute
    folders exactly the preset's, before the pipeline renders or pre-trains anything."""
    folders = lora_folders(loras)
    extra = sorted(set(folders) - set(attributes))
    missing = sorted(set(attributes) - set(folders))
    if extra or missing:
        raise UsageError(
            f"--loras {loras}: the pipeline mines the preset's attributes {list(attributes)}; "
            f"missing {missing}, not used {extra} (`attrspace mine --loras` takes any names)"
        )
    load_lora_set(folders)
