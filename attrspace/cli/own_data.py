"""`attrspace finetune --data DIR --bank FILE --out OUT` and `attrspace config`: checks and
commands (attrspace.pipeline.own_data does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from attrspace.cli.args import UsageError, check_output_folder

# Options of the pipeline's fine-tuning that mean nothing for a --data run.
PIPELINE_ONLY = ("loras", "tasks", "methods", "single_attribute", "rank", "rank_cap")


def add_own_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --bank, --resume: fine-tuning on your own scenes."""
    p.add_argument(
        "--data",
        type=Path,
        help="fine-tune on your own scenes: scene folders (images + cameras.json, see "
        "attrspace.data.folder) or a rendered family; writes OUT/adapter (peft) and a "
        "resumable OUT/state.safetensors",
    )
    p.add_argument(
        "--bank",
        type=Path,
        help="with --data: a bank file (attrspace's or the official layout) or a run folder "
        "(its mine/bank.safetensors)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --data: continue OUT's interrupted run (rerunning the command does too); "
        "an error when OUT holds no state",
    )


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config FILE and --set KEY=VALUE (fine-tuning settings; pipeline and --data runs)."""
    p.add_argument(
        "--config",
        type=Path,
        help="fine-tuning settings, a .toml or .yaml file (see "
        "`attrspace config --preset NAME` for every key)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable), e.g. --set optim.lr_m=1e-3 --set train.steps=200",
    )


def check_own_data(args: argparse.Namespace, preset_from_args, resolved_config) -> None:
    """Every input of a --data run, before any training work (UsageError or the input's own
    error, one line each)."""
    from attrspace.pipeline.own_data import STATE_FILE, check_inputs

    given = [f"--{k.replace('_', '-')}" for k in PIPELINE_ONLY if getattr(args, k, None)]
    if given:
        raise UsageError(f"{', '.join(given)}: options of the pipeline, not of --data runs")
    if args.bank is None:
        raise UsageError("--data needs --bank (a bank file or a run folder)")
    check_output_folder(args.out)
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.resume and not (args.out / STATE_FILE).is_file():
        raise UsageError(f"--resume: {args.out} holds no {STATE_FILE} to continue")
    args.preset_obj = preset_from_args(args)
    args.config_obj = resolved_config(args, args.preset_obj)
    args.inputs = check_inputs(
        args.data, args.bank, args.preset_obj, args.checkpoint, args.config_obj
    )


def run_own_data(args: argparse.Namespace) -> int:
    from attrspace.pipeline.own_data import train_checked

    device = args.preset_obj.device
    train_checked(
        args.inputs,
        args.out,
        args.config_obj,
        args.preset_obj,
        args.checkpoint,
        device,
        progress=not args.quiet,
    )
    return 0


def add_config_parser(sub) -> None:
    from attrspace.pipeline import PRESETS

    p = sub.add_parser(
        "config",
        help="print a preset's fine-tuning settings as TOML (the keys --config and --set take)",
    )
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS), help="default tiny")
    p.add_argument("--config", type=Path, help="apply a .toml or .yaml file on top")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one key")
    p.set_defaults(func=print_config, check=check_config)


def check_config(args: argparse.Namespace) -> None:
    from attrspace.pipeline import get_preset
    from attrspace.pipeline.presets import preset_defaults
    from attrspace.train.config import resolve_config

    base = preset_defaults(get_preset(args.preset))
    args.config_obj = resolve_config(base=base, file=args.config, overrides=args.set or ())


def print_config(args: argparse.Namespace) -> int:
    from attrspace.train.config import config_toml

    header = f"fine-tuning settings of preset {args.preset}"
    print(config_toml(args.config_obj, header=header), end="")
    return 0
