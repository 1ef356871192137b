"""The `attrspace` command line.

Pipeline commands (each runs the stages before it, taking finished ones from the cache in --out):
    render      render one synthetic family to a folder
    pretrain    render + pre-train the base model (tiny/small presets)
    train-lora  ... + one LoRA per attribute dataset
    mine        ... + the attribute subspace bank and the control banks
                (mine --loras DIR: a bank from your own peft LoRAs alone, any model)
    finetune    ... + every method on every downstream task, then report.md; with --data DIR
                --bank FILE: fine-tune on your own scenes into a peft adapter (resumable)
    run         everything, then report.md (the main job)
    report      rewrite report.md from a run folder
Tools: config (print a preset's fine-tuning settings as TOML), bench (one layer shape: frozen vs
SubspaceLinear vs LoRA), demo, backends, profile (saved activations of a VGGT training step per
method, by region).

Errors: a bad argument, a bad input file or an OS error ends the command with one line
`attrspace <cmd>: error: <what, which path>` on stderr and exit status 2. Arguments are checked
(against each other and the file system) before any work starts. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from attrspace.cli.args import (
    UsageError,
    check_output_folder,
    folder_path,
    int_at_least,
    seed_type,
)
from attrspace.cli.own_data import (
    add_config_arguments,
    add_config_parser,
    add_own_data_arguments,
    check_own_data,
    run_own_data,
)

# Exit status of an interrupted command (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse's error format without the usage block: `prog: error: message`, exit status 2
    (`prog` of a subcommand is "attrspace <cmd>"; --help still prints the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _progress_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr (none with --quiet); returns (tick, close)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=quiet, leave=False, file=sys.stderr)
    return (lambda: bar.update(1)), bar.close


def _demo(args: argparse.Namespace) -> int:
    import torch

    from attrspace.cli.demo import format_rows, run_demo, time_ratio_note

    torch.set_num_threads(args.threads) if args.threads else None
    print(
        f"attrspace demo: TinyViT dim={args.dim} depth={args.depth}, {args.tokens} tokens, "
        f"{args.steps} steps"
    )
    tick, close = _progress_bar(2 * (args.steps + 1), "demo steps", args.quiet)
    try:
        rows = run_demo(
            dim=args.dim,
            depth=args.depth,
            tokens=args.tokens,
            rank=args.rank,
            lora_rank=args.rank,
            steps=args.steps,
            seed=args.seed,
            progress=tick,
        )
    finally:
        close()
    print(format_rows(rows))
    sub, lora = rows
    print(
        f"subspace / LoRA: trainable {sub.trainable / lora.trainable:.3f}x, step time "
        f"{sub.step_ms / lora.step_ms:.2f}x (median of {args.steps} steps), saved activations "
        f"{sub.saved_mib / lora.saved_mib:.2f}x"
    )
    note = time_ratio_note(sub, lora)
    if note:
        print(note)
    return 0


def _backends(args: argparse.Namespace) -> int:
    from attrspace.backends import status as backends
    from attrspace.pipeline.workspace import check_environment

    for name, status in backends().items():
        print(f"{name:<8}{status}")
    check_environment()  # a bad ATTRSPACE_BACKEND: the listing, then the error line
    return 0


def _check_demo(args: argparse.Namespace) -> None:
    from attrspace.cli.demo import check_demo_args

    check_demo_args(args.dim, args.depth, args.tokens, args.rank, args.rank, args.steps, args.seed)


_CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}


def _check_profile(args: argparse.Namespace) -> None:
    from attrspace.measure.activations import check_profile_args

    check_profile_args(args.model, args.methods, args.frames, args.size)
    if args.png is not None:
        check_output_folder(args.png.parent, "--png")


def _profile(args: argparse.Namespace) -> int:
    import torch

    from attrspace.measure.activations import GIB, format_table, method_label, plot_rows
    from attrspace.measure.activations import profile_activations as profile

    def progress(i: int, n: int, row, seconds: float) -> None:
        print(
            f"[{i + 1}/{n}] {method_label(row.method)}, {row.frames} frames, checkpointing "
            f"{'on' if row.checkpointing else 'off'}: {row.total / GIB:.2f} GiB ({seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = profile(
        args.model,
        args.methods,
        args.frames,
        _CHECKPOINTING[args.checkpointing],
        args.size,
        dtype,
        progress,
    )
    print(format_table(rows))
    if args.png is not None:
        print(f"plot: {plot_rows(rows, args.png)}", file=sys.stderr)
    return 0


def _rank(text: str) -> int | str:
    if text in ("cliff", "energy"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"rank must be an int >= 1, 'cliff' or 'energy', got {text!r}"
        )
    return value


def _check_device(device: str, flag: str = "--device") -> None:
    """A cpu or cuda device that exists here ("auto" is always fine)."""
    from attrspace.util.checks import usable_device

    if device == "auto":
        return
    try:
        parsed = usable_device(device)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {device}: only cpu and cuda devices are supported")


def _preset_from_args(args: argparse.Namespace):
    from attrspace.pipeline import get_preset

    preset = get_preset(args.preset or "tiny")
    changes = {}
    for field in ("seed", "threads", "device"):
        value = getattr(args, field, None)
        if value is not None:
            changes[field] = value
    if getattr(args, "tasks", None):
        changes["tasks"] = tuple(args.tasks)
    if getattr(args, "methods", None):
        changes["methods"] = tuple(args.methods)
    if getattr(args, "single_attribute", None):
        changes["single_attribute"] = args.single_attribute
    mining = {}
    if getattr(args, "rank", None) is not None:
        mining["rank"] = args.rank
    if getattr(args, "rank_cap", None) is not None:
        mining["rank_cap"] = args.rank_cap
    if mining:
        changes["mining"] = replace(preset.mining, **mining)
    return preset.replace(**changes) if changes else preset


def _resolved_config(args: argparse.Namespace, preset):
    """The preset's fine-tuning defaults, then --config FILE, then every --set key=value."""
    from attrspace.pipeline.presets import preset_defaults
    from attrspace.train.config import resolve_config

    return resolve_config(
        base=preset_defaults(preset),
        file=getattr(args, "config", None),
        overrides=getattr(args, "set", None) or (),
    )


def _check_pipeline(args: argparse.Namespace) -> None:
    """Every argument of a pipeline command, before any stage runs."""
    from attrspace.pipeline.workspace import check_environment

    check_environment()
    check_output_folder(args.out)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    loras = getattr(args, "loras", None)
    if loras is not None and not loras.is_dir():
        raise UsageError(f"--loras {loras}: no such folder")
    if getattr(args, "bank", None) is not None or getattr(args, "resume", False):
        raise UsageError("--bank and --resume need --data (fine-tuning on your own scenes)")
    args.preset_obj = _preset_from_args(args)  # ValueError names the setting that cannot work
    if getattr(args, "config", None) is not None or getattr(args, "set", None):
        from attrspace.pipeline.presets import apply_finetune_config

        config = _resolved_config(args, args.preset_obj)
        args.preset_obj = apply_finetune_config(args.preset_obj, config)
    _check_device(args.preset_obj.device, "--device" if args.device else "the preset's device")
    if args.preset_obj.needs_checkpoint and args.checkpoint is None:
        raise UsageError(f"preset {args.preset} needs --checkpoint (a local VGGT weights file)")
    if loras is not None:
        from attrspace.cli.mine import check_pipeline_loras

        check_pipeline_loras(loras, args.preset_obj.attributes)


def _pipeline(until: str):
    def command(args: argparse.Namespace) -> int:
        from attrspace.pipeline import run_pipeline

        preset = args.preset_obj
        run_pipeline(
            preset,
            args.out,
            checkpoint=args.checkpoint,
            loras_dir=getattr(args, "loras", None),
            progress=not args.quiet,
            until=until,
            command=args.command,
            argv=getattr(args, "argv", None),
        )
        return 0

    return command


def _check_report(args: argparse.Namespace) -> None:
    from attrspace.pipeline.workspace import check_run_folder

    if not str(args.out).strip():
        raise UsageError("--out must name a run folder (got an empty path)")
    if not args.out.is_dir():
        raise UsageError(f"--out {args.out}: no such run folder")
    check_run_folder(args.out)


def _report(args: argparse.Namespace) -> int:
    from attrspace.pipeline import write_report
    from attrspace.pipeline.run import run_folder_lock

    with run_folder_lock(args.out):
        print(f"report: {write_report(args.out)}")
    return 0


def _check_bench(args: argparse.Namespace) -> None:
    from attrspace.backends import names

    _check_device(args.device)
    if args.backend not in ("auto", *names()):
        raise UsageError(f"--backend: choose auto or one of {list(names())}, got {args.backend!r}")
    if args.rank > min(args.d_in, args.d_out):
        raise UsageError(
            f"--rank {args.rank}: K must be <= min(--d-in, --d-out) = {min(args.d_in, args.d_out)}"
        )


def _bench(args: argparse.Namespace) -> int:
    import torch

    from attrspace.measure.lineup import bench_layer, format_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    tick, close = _progress_bar(3 * args.repeats, "bench rounds", args.quiet)
    try:
        rows = bench_layer(
            args.d_in,
            args.d_out,
            args.tokens,
            args.rank,
            args.lora_rank,
            steps=args.steps,
            backend=args.backend,
            device=args.device,
            repeats=args.repeats,
            progress=tick,
        )
    finally:
        close()
    print(
        f"one layer {args.d_in}->{args.d_out}, {args.tokens} tokens, K={args.rank}, LoRA r="
        f"{args.lora_rank}, fp32 on {args.device}, {torch.get_num_threads()} threads; forward + "
        f"backward, median of {args.steps} steps per repeat, median and range over "
        f"{args.repeats} interleaved repeats:"
    )
    print(format_rows(rows))
    return 0


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="time one layer: frozen nn.Linear vs SubspaceLinear vs LoRA",
        description="Time one training step (forward + backward) of one layer shape: the frozen "
        "nn.Linear, SubspaceLinear (random orthonormal bank) and LoRALinear, each measured "
        "--repeats times interleaved; reports the median, the range over the repeats, and says "
        "when that range does not resolve a ratio. Benchmarks of record: bench/ in a checkout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    positive = int_at_least(1)
    bench.add_argument("--d-in", type=positive, default=1024, help="input features of the layer")
    bench.add_argument("--d-out", type=positive, default=3072, help="output features")
    bench.add_argument("--tokens", type=positive, default=4096, help="rows of x per step")
    bench.add_argument("--rank", type=positive, default=64, help="K of the bank (SubspaceLinear)")
    bench.add_argument("--lora-rank", type=positive, default=16, help="r of the LoRA (alpha 2r)")
    bench.add_argument("--steps", type=positive, default=5, help="timed steps per repeat")
    bench.add_argument(
        "--repeats", type=positive, default=5, help="rounds over the three layers (interleaved)"
    )
    bench.add_argument(
        "--backend", default="auto", help="SubspaceLinear backend: auto, torch, triton or cuda"
    )
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument(
        "--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)"
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench, check=_check_bench)


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="inject a bank into a small ViT, train M, compare with LoRA",
        description="Inject a random orthonormal bank into a small ViT, train M for a few steps "
        "on a synthetic task and compare with LoRA of the same rank: trainable parameters, step "
        "time (median, with a note when the steps' spread does not resolve the ratio), "
        "saved-activation memory, loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    positive = int_at_least(1)
    demo.add_argument("--dim", type=positive, default=256, help="width (a multiple of dim // 64)")
    demo.add_argument("--depth", type=positive, default=4, help="transformer blocks")
    demo.add_argument("--tokens", type=int_at_least(2), default=1024, help="tokens, an even count")
    demo.add_argument("--rank", type=positive, default=16, help="K of the bank and r of the LoRA")
    demo.add_argument("--steps", type=positive, default=8, help="training steps per method")
    demo.add_argument("--seed", type=seed_type, default=0, help="seed of model, data and bank")
    demo.add_argument(
        "--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo, check=_check_demo)


def _add_pipeline_parser(sub, name: str, help_text: str, until: str) -> argparse.ArgumentParser:
    from attrspace.data import ATTRIBUTES, DOWNSTREAM_TASKS
    from attrspace.pipeline import METHODS, PRESETS

    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--preset", choices=tuple(PRESETS), help="sizes and settings (default tiny)")
    p.add_argument(
        "--out", type=folder_path, required=True, help="run folder (stages are cached here)"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="local VGGT weights (vggt1b preset); with --data also a model folder (config.json)",
    )
    p.add_argument("--seed", type=seed_type, help="override the preset's seed")
    p.add_argument("--threads", type=int_at_least(0), help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the preset's device")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    if until in ("mine", "finetune"):
        p.add_argument(
            "--loras",
            type=Path,
            help=(
                "peft LoRAs of any model, any attribute names: DIR/<attribute>/<lora>/; mine alone "
                "(no base model, nothing rendered), the bank, figures and report.md into --out"
                if until == "mine"
                else "use LoRAs trained elsewhere: DIR/<attribute>/<dataset>/ (peft)"
            ),
        )
        p.add_argument("--rank", type=_rank, help="mining rank rule: an int, 'cliff' or 'energy'")
        p.add_argument(
            "--rank-cap", type=int_at_least(1), help="largest rank per layer and attribute"
        )
        p.add_argument(
            "--single-attribute",
            choices=ATTRIBUTES,
            help="attribute of the single-attribute control",
        )
    if until == "finetune":
        p.add_argument("--tasks", nargs="+", choices=DOWNSTREAM_TASKS, help="downstream tasks")
        p.add_argument("--methods", nargs="+", choices=METHODS, help="fine-tuning methods")
        add_config_arguments(p)
    p.set_defaults(func=_pipeline(until), check=_check_mine if until == "mine" else _check_pipeline)
    if name == "finetune":
        add_own_data_arguments(p)
        p.set_defaults(func=_finetune, check=_check_finetune)
    return p


def _check_finetune(args: argparse.Namespace) -> None:
    """`attrspace finetune`: the pipeline's stage, or with --data a run on your own scenes."""
    if args.data is None:
        _check_pipeline(args)
        return
    check_own_data(args, _preset_from_args, _resolved_config)
    _check_device(args.preset_obj.device, "--device" if args.device else "the preset's device")


def _finetune(args: argparse.Namespace) -> int:
    if args.data is None:
        return _pipeline("finetune")(args)
    return run_own_data(args)


def _add_profile_parser(sub) -> None:
    positive = int_at_least(1)
    prof = sub.add_parser(
        "profile",
        help="saved-activation bytes of one VGGT training step per method, by region (meta device)",
        description="Count exactly, on the meta device (no memory allocated, seconds on a CPU), "
        "what one training step keeps for backward: frozen vs SubspaceLinear K vs LoRA r on the "
        "192 aggregator block linears, per frame count and checkpointing setting, split into "
        "DINO, blocks and heads. Prints a markdown table; progress goes to stderr.",
    )
    prof.add_argument(
        "--model",
        default="vggt1b",
        help="a preset name (micro, tiny, small, vggt1b, study) or a config.json path "
        "(default: vggt1b, VGGT-1B without the point head)",
    )
    prof.add_argument(
        "--methods",
        nargs="+",
        default=["frozen", "subspace:16", "lora:16"],
        help="frozen, subspace:K and/or lora:r (default: frozen subspace:16 lora:16)",
    )
    prof.add_argument(
        "--frames",
        nargs="+",
        type=positive,
        default=[8, 24],
        help="frames per scene (default: 8 24)",
    )
    prof.add_argument(
        "--checkpointing",
        choices=tuple(_CHECKPOINTING),
        default="both",
        help="gradient checkpointing of the aggregator blocks and heads (default: both)",
    )
    prof.add_argument(
        "--size",
        type=positive,
        default=None,
        help="image side in pixels, a multiple of the patch size (default: the model's img_size)",
    )
    prof.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="the aggregator's dtype; the heads stay fp32 (default: bf16)",
    )
    prof.add_argument(
        "--png", type=Path, default=None, help="also write a stacked bar chart here (matplotlib)"
    )
    prof.set_defaults(func=_profile, check=_check_profile)


def _check_mine(args: argparse.Namespace) -> None:
    """`mine --loras` is the standalone command (attrspace.cli.mine); `mine` alone the stage."""
    if args.loras is None:
        return _check_pipeline(args)
    from attrspace.cli.mine import check_mine_loras

    check_mine_loras(args)


def build_parser() -> argparse.ArgumentParser:
    from attrspace.cli.args import add_render_parser

    parser = OneLineParser(
        prog="attrspace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_render_parser(sub)
    _add_pipeline_parser(
        sub, "pretrain", "pre-train the base model on the mixed family", "pretrain"
    )
    _add_pipeline_parser(
        sub, "train-lora", "train one LoRA per dataset of each attribute family", "train-lora"
    )
    _add_pipeline_parser(
        sub, "mine", "mine the attribute subspace bank (and the control banks)", "mine"
    )
    _add_pipeline_parser(
        sub,
        "finetune",
        "fine-tune every method on the downstream tasks, write the report",
        "finetune",
    )
    _add_pipeline_parser(
        sub, "run", "every stage end to end, then report.md (the main job)", "finetune"
    )

    add_config_parser(sub)
    report = sub.add_parser("report", help="rewrite OUT/report.md from a run folder")
    report.add_argument("--out", type=folder_path, required=True, help="run folder")
    report.set_defaults(func=_report, check=_check_report)

    _add_bench_parser(sub)
    _add_demo_parser(sub)

    _add_profile_parser(sub)

    info = sub.add_parser(
        "backends", help="which backends of the adapted layer run here, and why not"
    )
    info.set_defaults(func=_backends)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a bad input or the machine's state, never a bug: printed as one
    line. A plain ValueError or RuntimeError raised during the work keeps its traceback."""
    from attrspace.bank import BankFileError
    from attrspace.data.folder import SceneFormatError
    from attrspace.data.storage import ShardError
    from attrspace.export.peft_folder import AdapterFileError
    from attrspace.pipeline.cache import StageFileError
    from attrspace.pipeline.workspace import RunInputError
    from attrspace.train.config import ConfigError
    from attrspace.train.resumable import StateFileError
    from attrspace.util.files import BadFileError
    from attrspace.util.folders import FolderBusyError

    return (
        OSError,
        BadFileError,
        UsageError,
        FolderBusyError,
        RunInputError,
        StageFileError,
        ShardError,
        BankFileError,
        AdapterFileError,
        ConfigError,
        StateFileError,
        SceneFormatError,
    )


def describe(exc: BaseException) -> str:
    """One line for an exception: OSErrors as "what: path" (no errno), others as their message."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
        return text + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a rejected argument (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"attrspace {args.command}"
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in a run's runs.json
    check = getattr(args, "check", None)
    if check is not None:
        try:
            check(args)  # arguments only: every ValueError here is about one of them
        except (ValueError, OSError) as exc:
            print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
