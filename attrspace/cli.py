"""The `attrspace` command line.

Pipeline commands (each runs the stages before it, taking finished ones from the cache in --out):
    render      render one synthetic family to a folder
    pretrain    render + pre-train the base model (tiny/small presets)
    train-lora  ... + one LoRA per attribute dataset
    mine        ... + the attribute subspace bank and the control banks
    finetune    ... + every method on every downstream task, then report.md
    run         everything, then report.md (the main job)
    report      rewrite report.md from a run folder
Tools: bench (one layer shape: frozen vs SubspaceLinear vs LoRA), demo, backends.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import format_rows, run_demo

    torch.set_num_threads(args.threads) if args.threads else None
    print(
        f"attrspace demo: TinyViT dim={args.dim} depth={args.depth}, {args.tokens} tokens, "
        f"{args.steps} steps"
    )
    rows = run_demo(
        dim=args.dim,
        depth=args.depth,
        tokens=args.tokens,
        rank=args.rank,
        steps=args.steps,
        seed=args.seed,
    )
    print(format_rows(rows))
    sub, lora = rows
    print(
        f"subspace / LoRA: trainable {sub.trainable / lora.trainable:.3f}x, step time "
        f"{sub.step_ms / lora.step_ms:.2f}x, saved activations "
        f"{sub.saved_mib / lora.saved_mib:.2f}x"
    )
    return 0


def _backends(args: argparse.Namespace) -> int:
    from .dispatch import backends

    for name, status in backends().items():
        print(f"{name:<8}{status}")
    return 0


def _rank(text: str) -> int | str:
    if text in ("cliff", "energy"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rank must be an int, 'cliff' or 'energy', got {text!r}"
        ) from None


def _preset_from_args(args: argparse.Namespace):
    from .pipeline import get_preset

    preset = get_preset(args.preset)
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


def _pipeline(until: str):
    def command(args: argparse.Namespace) -> int:
        from .pipeline import run_pipeline

        preset = _preset_from_args(args)
        run_pipeline(
            preset,
            args.out,
            checkpoint=args.checkpoint,
            loras_dir=getattr(args, "loras", None),
            progress=not args.quiet,
            until=until,
            command=args.command,
        )
        return 0

    return command


def _report(args: argparse.Namespace) -> int:
    from .pipeline import write_report

    print(f"report: {write_report(args.out)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .pipeline.layer_bench import bench_layer, format_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_layer(
        args.d_in,
        args.d_out,
        args.tokens,
        args.rank,
        args.lora_rank,
        steps=args.steps,
        backend=args.backend,
        device=args.device,
    )
    print(
        f"one layer {args.d_in}->{args.d_out}, {args.tokens} tokens, K={args.rank}, LoRA r="
        f"{args.lora_rank}, fp32 on {args.device}, {torch.get_num_threads()} threads, median of "
        f"{args.steps} steps (forward + backward):"
    )
    print(format_rows(rows))
    return 0


def _add_pipeline_parser(sub, name: str, help_text: str, until: str) -> argparse.ArgumentParser:
    from .data import ATTRIBUTES, DOWNSTREAM_TASKS
    from .pipeline import METHODS, PRESETS

    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument(
        "--preset", default="tiny", choices=tuple(PRESETS), help="sizes and settings (default tiny)"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (stages are cached here)")
    p.add_argument("--checkpoint", type=Path, help="local official VGGT weights (vggt1b preset)")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the preset's device")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    if until in ("mine", "finetune"):
        p.add_argument(
            "--loras",
            type=Path,
            help="use LoRAs trained elsewhere: DIR/<attribute>/<dataset>/ (peft)",
        )
        p.add_argument("--rank", type=_rank, help="mining rank rule: an int, 'cliff' or 'energy'")
        p.add_argument("--rank-cap", type=int, help="largest rank per layer and attribute")
        p.add_argument(
            "--single-attribute",
            choices=ATTRIBUTES,
            help="attribute of the single-attribute control",
        )
    if until == "finetune":
        p.add_argument("--tasks", nargs="+", choices=DOWNSTREAM_TASKS, help="downstream tasks")
        p.add_argument("--methods", nargs="+", choices=METHODS, help="fine-tuning methods")
    p.set_defaults(func=_pipeline(until))
    return p


def build_parser() -> argparse.ArgumentParser:
    from .data.cli import add_render_parser

    parser = argparse.ArgumentParser(
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

    report = sub.add_parser("report", help="rewrite OUT/report.md from a run folder")
    report.add_argument("--out", type=Path, required=True, help="run folder")
    report.set_defaults(func=_report)

    bench = sub.add_parser(
        "bench", help="time one layer: frozen nn.Linear vs SubspaceLinear vs LoRA"
    )
    bench.add_argument("--d-in", type=int, default=1024)
    bench.add_argument("--d-out", type=int, default=3072)
    bench.add_argument("--tokens", type=int, default=4096)
    bench.add_argument("--rank", type=int, default=64, help="K of the bank")
    bench.add_argument("--lora-rank", type=int, default=16)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument("--backend", default="auto", help="SubspaceLinear backend")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="inject a bank into a small ViT, train M, compare with LoRA")
    demo.add_argument("--dim", type=int, default=256)
    demo.add_argument("--depth", type=int, default=4)
    demo.add_argument("--tokens", type=int, default=1024)
    demo.add_argument("--rank", type=int, default=16, help="K of the bank and r of the LoRA")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo.set_defaults(func=_demo)

    info = sub.add_parser(
        "backends", help="which backends of the adapted layer run here, and why not"
    )
    info.set_defaults(func=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"attrspace {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
