"""peft for the benchmark scripts, imported with the checkout's root off sys.path: the root's
kernels/ folder would shadow the Hugging Face `kernels` package that peft imports."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_peft():
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    try:
        import peft
    finally:
        sys.path[:] = saved
    return peft
