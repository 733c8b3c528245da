"""Timing and table helpers shared by the benchmark workloads."""
from __future__ import annotations

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
