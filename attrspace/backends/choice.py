"""Backend choice by measurement: "auto" times every backend that can run a layer, once per (device,
dtype, d_in, d_out, K, token bucket), and keeps the fastest, in memory and in a small JSON file under
the user's cache folder ($XDG_CACHE_HOME/attrspace or ~/.cache/attrspace), so a later process on the
same machine does not time again.

Each backend runs its forward and backward (need_dx) on fresh random inputs of the bucket's size (own
generator: the caller's random stream is not touched), outside autograd; the real weight is read,
never written, and no module is changed. Before it is timed, every backend but torch must reproduce
the torch backend's y, z, dx and g on those inputs within AGREEMENT_RTOL: one that does not is left
out with a warning, so a fused kernel that is fast but wrong on an untried GPU is never what "auto"
picks. Under torch.compile nothing is timed: a key measured earlier (an eager step, or the cache
file) is a constant for the tracer, and an unmeasured key takes the first candidate (the static
order of attrspace.backends) so that the graph stays one graph; the same holds while a CUDA graph is
being captured.

The file is checked when read; a corrupt or foreign file is ignored with a warning and rewritten.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from attrspace.backends.registry import implementation, names
from attrspace.measure.profiling import time_steps
from attrspace.util.files import atomic_write_bytes

CACHE_VERSION = 1
CACHE_FILE = "backend_choice.json"
TIMED_RUNS = 5


@dataclass(frozen=True)
class Choice:
    backend: str
    times_ms: dict[str, float]  # forward + backward, median, per backend timed


# (device label, dtype name, d_in, d_out, K, token bucket) -> Choice
Key = tuple[str, str, int, int, int, int]
_MEMORY: dict[Key, Choice] = {}
_DEVICE_LABELS: dict[tuple[str, int | None], str] = {}
_disk = {"read": False}


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "attrspace" / CACHE_FILE


def token_bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: layers within a factor of two share a measurement."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def _device_label(device: torch.device) -> str:
    # The GPU's name, so a cache file shared by two machines (a home folder on NFS) keeps them apart.
    slot = (device.type, device.index)
    label = _DEVICE_LABELS.get(slot)
    if label is None:
        label = str(device)
        if device.type == "cuda":
            label = f"cuda {torch.cuda.get_device_name(device)}"
        _DEVICE_LABELS[slot] = label
    return label


def key_of(x: Tensor, weight: Tensor, rank: int) -> Key:
    d_out, d_in = weight.shape
    tokens = math.prod(x.shape[:-1])
    dtype = str(x.dtype).removeprefix("torch.")
    return (_device_label(x.device), dtype, int(d_in), int(d_out), int(rank), token_bucket(tokens))


def default_timer(step: Callable[[], None], device: torch.device) -> float:
    """Median seconds of `step()` over TIMED_RUNS runs after one warm-up run (which also lets Triton
    autotune), synchronising the device around each run."""
    return time_steps(step, TIMED_RUNS, warmup=1, device=device)


# Relative Frobenius error a backend may show against the torch backend on the timing inputs before
# it is left out of "auto": fp32 kernels may use TF32 tensor cores (10-bit mantissa), half-precision
# ones round their inputs and outputs.
AGREEMENT_RTOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def _inputs(x: Tensor, weight: Tensor, rank: int) -> tuple[Tensor, ...]:
    """Random inputs of the bucket's size (own generator: the caller's stream is not touched)."""
    tokens = token_bucket(math.prod(x.shape[:-1]))
    d_out, d_in = weight.shape
    gen = torch.Generator(device=x.device).manual_seed(0)

    def rand(*shape, dtype=x.dtype):
        return torch.randn(*shape, generator=gen, device=x.device, dtype=dtype)

    xt, dy = rand(tokens, d_in), rand(tokens, d_out)
    U, V = rand(d_out, rank) * d_out**-0.5, rand(d_in, rank) * d_in**-0.5
    P, Q = rand(d_out, rank, dtype=torch.float32), rand(d_in, rank, dtype=torch.float32)
    return xt, dy, U, V, P, Q


def _outputs(name: str, weight: Tensor, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    impl = implementation(name)
    xt, dy, U, V, P, Q = inputs
    with torch.no_grad():
        return [*impl.forward(xt, weight, None, V, P), *impl.backward(dy, weight, U, Q, True)]


def _disagreement(name: str, weight: Tensor, inputs, reference: list[Tensor]) -> str | None:
    """Why backend `name` must not be chosen (its results differ from the torch backend's), or None.

    None of the fused kernels may be trusted on a GPU they never ran on: a kernel that is fast but
    wrong there is left out, never picked by "auto" (an explicit backend= still runs it)."""
    rtol = AGREEMENT_RTOL.get(inputs[0].dtype, 1e-6)
    got = _outputs(name, weight, inputs)
    for label, a, b in zip(("y", "z", "dx", "g"), got, reference, strict=True):
        a, b = a.float(), b.float()
        error = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if not math.isfinite(error) or error > rtol:
            return f"{label} differs from the torch backend by {error:.2e} (relative; limit {rtol:.0e})"
    return None


def _pass(name: str, weight: Tensor, inputs) -> Callable[[], None]:
    def step():
        _outputs(name, weight, inputs)

    return step


def measure(
    names: list[str], x: Tensor, weight: Tensor, rank: int, timer: Callable | None = None
) -> Choice:
    """Time every backend in `names` on inputs shaped like these; the fastest wins. A backend that
    fails, or whose results differ from the torch backend's on the same inputs, is left out with a
    warning naming it (at least one must run)."""
    timer = timer or default_timer
    inputs = _inputs(x, weight, rank)
    times, failures, reference = {}, [], None
    for name in names:
        try:
            if name != "torch":
                reference = reference or _outputs("torch", weight, inputs)
                reason = _disagreement(name, weight, inputs, reference)
                if reason is not None:
                    failures.append(f"{name}: {reason}")
                    continue
            times[name] = 1e3 * float(timer(_pass(name, weight, inputs), x.device))
        except Exception as exc:  # a kernel that cannot launch here must not take "auto" down
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    key = key_of(x, weight, rank)
    if failures:
        warnings.warn(
            f"backend choice for {describe_key(key)}: left out: " + "; ".join(failures),
            stacklevel=3,
        )
    if not times:
        raise RuntimeError(f"no backend ran {describe_key(key)}: " + "; ".join(failures))
    return Choice(min(times, key=times.__getitem__), times)


def choose(
    candidates: list[str], x: Tensor, weight: Tensor, rank: int, timer: Callable | None = None
) -> str:
    """The backend "auto" runs: the only candidate, or the measured fastest (timed at first use)."""
    if len(candidates) == 1:
        return candidates[0]
    if torch.compiler.is_compiling() and (x.device.type, x.device.index) not in _DEVICE_LABELS:
        return candidates[0]  # naming the device is a driver call; nothing was measured here anyway
    key = key_of(x, weight, rank)
    hit = _MEMORY.get(key)
    if hit is not None and hit.backend in candidates:
        return hit.backend
    if torch.compiler.is_compiling() or (
        x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ):  # nothing can be timed while tracing or capturing a CUDA graph
        return candidates[0]
    if not _disk["read"]:
        _MEMORY.update({k: v for k, v in read_cache().items() if k not in _MEMORY})
        _disk["read"] = True
        hit = _MEMORY.get(key)
        if hit is not None and hit.backend in candidates:
            return hit.backend
    choice = _MEMORY[key] = measure(candidates, x, weight, rank, timer)
    write_cache()
    return choice.backend


def choices() -> dict[Key, Choice]:
    """What this process measured or read from the cache file so far."""
    return dict(_MEMORY)


def forget() -> None:
    """Drop the in-memory choices (the file stays); the next use reads the file again."""
    _MEMORY.clear()
    _disk["read"] = False


def describe_key(key: Key) -> str:
    device, dtype, d_in, d_out, rank, bucket = key
    return f"{device} {dtype} {d_in}->{d_out} K={rank} T<={bucket}"


def describe(key: Key, choice: Choice) -> str:
    times = ", ".join(f"{n} {t:.3f}" for n, t in sorted(choice.times_ms.items()))
    return f"{describe_key(key)}: {choice.backend} ({times})"


_FIELDS = ("device", "dtype", "d_in", "d_out", "rank", "bucket")


def _parse(text: str) -> dict[Key, Choice]:
    """The entries of a cache file; ValueError saying what is wrong with it."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        raise ValueError(f"not a version-{CACHE_VERSION} attrspace backend-choice file")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError("'entries' is not a list")
    out = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i} is not an object")
        missing = [f for f in (*_FIELDS, "backend", "times_ms") if f not in entry]
        if missing:
            raise ValueError(f"entry {i} lacks {missing}")
        key = tuple(entry[f] for f in _FIELDS)
        if not all(isinstance(v, str) for v in key[:2]) or not all(
            type(v) is int and v > 0 for v in key[2:]
        ):
            raise ValueError(f"entry {i} has a malformed key {key}")
        times = entry["times_ms"]
        if not isinstance(times, dict) or not all(
            n in names() and isinstance(t, int | float) and math.isfinite(t) and t >= 0
            for n, t in times.items()
        ):
            raise ValueError(f"entry {i} has malformed times {times!r}")
        if entry["backend"] not in times:
            raise ValueError(f"entry {i} chose {entry['backend']!r}, which it did not time")
        out[key] = Choice(entry["backend"], {n: float(t) for n, t in times.items()})
    return out


def read_cache() -> dict[Key, Choice]:
    """The valid entries of the cache file; a missing file is empty, a corrupt one warns."""
    path = cache_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(
            f"cannot read backend-choice cache {path} ({exc}); timing again", stacklevel=3
        )
        return {}
    try:
        return _parse(text)
    except (ValueError, TypeError) as exc:
        warnings.warn(
            f"ignoring corrupt backend-choice cache {path} ({exc}); it will be rewritten",
            stacklevel=3,
        )
        return {}


def write_cache() -> None:
    """Write the in-memory choices (merged over the file's valid entries) atomically. A cache folder
    that cannot be written costs only the re-timing in the next process, so it warns, not raises."""
    merged = {**read_cache(), **_MEMORY}
    entries = [
        {**dict(zip(_FIELDS, key, strict=True)), "backend": c.backend, "times_ms": c.times_ms}
        for key, c in sorted(merged.items())
    ]
    data = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1).encode()
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as exc:
        warnings.warn(f"cannot write backend-choice cache {path} ({exc})", stacklevel=3)
