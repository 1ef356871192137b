"""kernels/_config.py: the launchers' host-side integer helpers agree with Triton's own."""

import pytest

triton = pytest.importorskip("triton")
from attrspace.kernels._config import cdiv, next_power_of_2  # noqa: E402


def test_integer_helpers_match_triton():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for n in range(0, 5000):
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
