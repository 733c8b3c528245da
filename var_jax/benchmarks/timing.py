"""Timing and table helpers shared by the benchmark workloads."""
from __future__ import annotations

import collections
import pathlib
import tempfile
import time

import jax


def timed(fn, warmup: int, repeats: int) -> tuple[float, list[float], object]:
    """-> (first call's seconds, compile included; timed runs' seconds; last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times, out


def device_kind() -> str:
    """The first device, as the tables name it ('cpu', 'gpu NVIDIA H100 80GB HBM3', ...)."""
    dev = jax.devices()[0]
    return dev.device_kind if dev.device_kind == dev.platform else f'{dev.platform} {dev.device_kind}'


def num(v: float) -> str:
    return f'{v:.3g}' if v < 1000 else f'{v:,.0f}'


def int_list(text: str, flag: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise ValueError(f'{flag} must be comma-separated integers, got {text!r}') from None
    if not out or min(out) < 1:
        raise ValueError(f'{flag} must be positive integers, got {text!r}')
    return out


def check_runs(warmup: int, repeats: int) -> None:
    if warmup < 1 or repeats < 1:
        raise ValueError('--warmup and --repeats must be >= 1')


def op_profile(fn) -> tuple[float, list[tuple[str, float, int]]]:
    """Run `fn` once under `jax.profiler` -> (seconds in XLA ops, [(op, seconds, calls)] slowest first).

    The ops are the executable's thunks as the profiler names them (fusion names as in the
    compiled HLO, `ynn_fusion*` = XLA:CPU's YNNPACK kernels); an op inside a scanned layer is
    summed over its calls. Host-side events (Python, dispatch, thread-pool bookkeeping) are left out.
    """
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn())
        (path,) = pathlib.Path(d).rglob('*.xplane.pb')
        data = jax.profiler.ProfileData.from_file(str(path))
        seconds, calls = collections.Counter(), collections.Counter()
        planes = [p for p in data.planes if p.name.startswith('/device:')]  # an accelerator's kernels
        for plane in planes or [p for p in data.planes if p.name == '/host:CPU']:  # else XLA:CPU's thunks
            for line in plane.lines:
                if line.name == 'python':
                    continue
                for e in line.events:
                    if e.name.startswith(('ThreadpoolListener', 'end:', 'ThunkExecutor')):
                        continue
                    seconds[e.name] += e.duration_ns / 1e9
                    calls[e.name] += 1
    return sum(seconds.values()), [(n, t, calls[n]) for n, t in seconds.most_common()]
