"""Shared utilities: argument checks, the one atomic file writer and bounded reader, the one folder swap
and lock. Not public: no stable API. See docs/design.md, "Files"."""
