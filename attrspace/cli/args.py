"""The `attrspace render` subcommand: draw, render and store one family with a progress bar, then
write its contact sheet. The top-level CLI calls add_render_parser and dispatches to run_render."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from attrspace.data.families import FAMILIES

SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; evaluation adds a scene index to one


class UsageError(ValueError):
    """A command-line argument that cannot work (checked before any work starts)."""


def int_at_least(low: int):
    """An argparse type: an int >= low (the message names the bound and the text given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def seed_type(text: str) -> int:
    """An argparse type: a seed, an int in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an int in [0, 2**63), got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is an int in [0, 2**63), got {value}")
    return value


def folder_path(text: str) -> Path:
    """An argparse type: a folder path, never empty (Path("") would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder (got an empty path)")
    return Path(text)


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """UsageError unless `path` can be (or is) a folder this process writes into: named, not a
    file, not under a file, and its first existing folder writable."""
    if not str(path).strip():
        raise UsageError(f"{flag} must name a folder (got an empty path)")
    path = Path(path)
    for parent in (path, *path.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            if parent == path:
                raise UsageError(f"{flag} {path}: exists and is a file, not a folder")
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: {parent} is not writable")
        return


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
    positive = int_at_least(1)
    p.add_argument(
        "--datasets", type=positive, default=10, help="datasets in the family (default 10)"
    )
    p.add_argument("--scenes", type=positive, default=16, help="scenes per dataset (default 16)")
    p.add_argument("--views", type=positive, default=4, help="views per scene (default 4)")
    p.add_argument(
        "--size", type=int, default=56, help="image side in pixels, a multiple of 14 (default 56)"
    )
    p.add_argument("--seed", type=seed_type, default=0, help="seed of every draw (default 0)")
    p.add_argument("--out", type=folder_path, required=True, help="output folder")
    p.add_argument(
        "--shard-scenes", type=positive, default=64, help="scenes per shard file (default 64)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a family already in --out")
    p.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="torch intra-op threads while rendering (default 1: a second thread helps only at "
        "large sizes on an otherwise idle machine)",
    )
    p.add_argument("--no-contact-sheet", action="store_true", help="skip contact_sheet.png")
    p.add_argument(
        "--sheet-scenes", type=positive, default=4, help="scenes per row of the contact sheet"
    )
    p.add_argument(
        "--sheet-views", type=positive, default=2, help="views per scene on the contact sheet"
    )
    p.set_defaults(func=run_render, check=check_render)
    return p


def check_render(args: argparse.Namespace) -> None:
    """Every argument of `render`, before anything is drawn (ValueError names the argument)."""
    from attrspace.data.render import check_size

    check_output_folder(args.out)
    try:
        check_size(args.size)
    except ValueError as exc:
        raise UsageError(f"--size {args.size}: {exc}") from None
    if not args.no_contact_sheet:
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise UsageError(
                "contact sheets need Pillow (pip install 'attrspace[data]'); "
                "or pass --no-contact-sheet"
            ) from None


def run_render(args: argparse.Namespace) -> int:
    """Render the family described by args into args.out; returns a process exit code (0).

    Holds a lock beside the folder (`.NAME.lock` in its parent) while it works. A folder that
    holds the same family (same settings, every shard verified) is left as it is; one with other
    settings is refused unless --overwrite is given."""
    from attrspace.data.render import check_size
    from attrspace.data.storage import MultiViewDataset, check_family_target, family_settings
    from attrspace.util.folders import folder_lock, lock_beside

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, lock_beside(out)):
        settings = family_settings(
            args.attribute,
            args.datasets,
            args.scenes,
            args.views,
            *check_size(args.size),
            args.seed,
        )
        if check_family_target(out, settings, args.overwrite, flag="--overwrite") == "same":
            data = MultiViewDataset(out, cache_shards=1)
            for i in range(len(data)):  # reads and verifies every shard against its checksum
                data[i]
            print(f"{out} already holds this family (every shard verified); nothing to do")
            return 0
        return _render(args, out)


def _render(args: argparse.Namespace, out: Path) -> int:
    from tqdm.auto import tqdm

    from attrspace.data.storage import write_family
    from attrspace.util.files import atomic_write_bytes

    total = args.datasets * args.scenes
    with tqdm(total=total, desc=f"render {args.attribute}", unit="scene") as bar:
        manifest = write_family(
            out,
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
        f"({n_bytes / 1e6:.1f} MB) to {out}"
    )
    if not args.no_contact_sheet:
        from attrspace.data.contact_sheet import contact_sheet_from_folder

        # Drawn to a hidden file, then put in place whole (atomic_write_bytes).
        hidden = out / ".contact_sheet.draw.png"
        contact_sheet_from_folder(out, hidden, scenes=args.sheet_scenes, views=args.sheet_views)
        png = out / "contact_sheet.png"
        try:
            atomic_write_bytes(png, hidden.read_bytes())
        finally:
            hidden.unlink(missing_ok=True)
        print(f"contact sheet: {png}")
    return 0
