"""The `attrspace` command line: `main` (the commands), `args` (argument types and checks shared by every
command), `demo` (the one-minute adapter demo)."""

from attrspace.cli.main import main

__all__ = ["main"]
