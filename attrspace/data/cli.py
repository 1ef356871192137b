"""The `attrspace render` subcommand: draw, render and store one family with a progress bar, then
write its contact sheet. The top-level CLI calls add_render_parser and dispatches to run_render."""

from __future__ import annotations

import argparse
from pathlib import Path

from attrspace.data.families import FAMILIES


def add_render_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `render` to an argparse subparsers object; sets func=run_render on the parsed args."""
    p = subparsers.add_parser(
        "render",
        help="render a synthetic multi-view family to a folder",
        description="Render a family of datasets in which only one attribute varies (or the mixed "
        "family, or a held-out downstream task) into safetensors shards plus manifest.json.",
    )
    p.add_argument(
        "--attribute",
        required=True,
        choices=FAMILIES,
        help="texture/geometry/camera/lighting vary one attribute; mixed varies all; "
        "microbaseline/photo/unusual_lighting are held-out downstream tasks",
    )
    p.add_argument("--datasets", type=int, default=10, help="datasets in the family (default 10)")
    p.add_argument("--scenes", type=int, default=16, help="scenes per dataset (default 16)")
    p.add_argument("--views", type=int, default=4, help="views per scene (default 4)")
    p.add_argument(
        "--size", type=int, default=56, help="image side in pixels, a multiple of 14 (default 56)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--shard-scenes", type=int, default=64, help="scenes per shard file (default 64)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a family already in --out")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads while rendering (default 1: a second thread helps only at "
        "large sizes on an otherwise idle machine)",
    )
    p.add_argument("--no-contact-sheet", action="store_true", help="skip contact_sheet.png")
    p.add_argument(
        "--sheet-scenes", type=int, default=4, help="scenes per row of the contact sheet"
    )
    p.add_argument(
        "--sheet-views", type=int, default=2, help="views per scene on the contact sheet"
    )
    p.set_defaults(func=run_render)
    return p


def run_render(args: argparse.Namespace) -> int:
    """Render the family described by args into args.out; returns a process exit code (0)."""
    from tqdm.auto import tqdm

    from attrspace.data.storage import write_family

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    total = args.datasets * args.scenes
    with tqdm(total=total, desc=f"render {args.attribute}", unit="scene") as bar:
        manifest = write_family(
            args.out,
            args.attribute,
            args.datasets,
            args.scenes,
            args.views,
            args.size,
            args.seed,
            shard_scenes=args.shard_scenes,
            overwrite=args.overwrite,
            on_scene=lambda: bar.update(1),
            threads=args.threads,
        )
    n_bytes = sum(s["bytes"] for d in manifest["datasets"] for s in d["shards"])
    print(
        f"wrote {total} scenes x {args.views} views at {args.size} px "
        f"({n_bytes / 1e6:.1f} MB) to {args.out}"
    )
    if not args.no_contact_sheet:
        from attrspace.data.contact_sheet import contact_sheet_from_folder

        png = contact_sheet_from_folder(
            args.out,
            Path(args.out) / "contact_sheet.png",
            scenes=args.sheet_scenes,
            views=args.sheet_views,
        )
        print(f"contact sheet: {png}")
    return 0
