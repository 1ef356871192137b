"""The `attrspace` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import format_rows, run_demo

    torch.set_num_threads(args.threads) if args.threads else None
    print(
        f"attrspace demo: TinyViT dim={args.dim} depth={args.depth}, {args.tokens} tokens, {args.steps} steps"
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
        f"{sub.step_ms / lora.step_ms:.2f}x, saved activations {sub.saved_mib / lora.saved_mib:.2f}x"
    )
    return 0


def _backends(args: argparse.Namespace) -> int:
    from .dispatch import backends

    for name, status in backends().items():
        print(f"{name:<8}{status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrspace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
