"""Torch-exact 2-D resizes as precomputed (out, in) matrices.

VAR moves feature maps between scales with `F.interpolate(mode='area')` (every downsample)
and `F.interpolate(mode='bicubic', align_corners=False)` (every token map -> full latent).
`jax.image.resize` matches neither: its bicubic uses Keys a=-0.5, renormalises at the border
and antialiases. The sizes involved are small and static (<= 32), so each resize is a pair of
dense matrices applied as one einsum; that is exact to float rounding and cheap on any backend.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

BICUBIC_A = -0.75  # torch's cubic-convolution coefficient (not Keys' -0.5)


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling: output i averages input [floor(i*in/out), ceil((i+1)*in/out)).

    Windows overlap when `n_in` is not a multiple of `n_out` (16 -> 13, 10, 6, 5, 3).
    """
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.astype(np.float32)


def _cubic(t: float, a: float) -> tuple[float, float, float, float]:
    """Weights of the taps at offsets -1, 0, 1, 2 for fractional position t in [0, 1)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int, a: float = BICUBIC_A) -> np.ndarray:
    """torch bicubic, align_corners=False, no antialias, borders clamped (replicate)."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5  # not clamped at 0 for cubic, as in torch
        base = min(math.floor(src), n_in - 1)
        t = min(max(src - base, 0.0), 1.0)
        for off, w in zip((-1, 0, 1, 2), _cubic(t, a)):
            m[i, min(max(base + off, 0), n_in - 1)] += w
    return m.astype(np.float32)


_MATRICES = {'area': area_matrix, 'bicubic': bicubic_matrix}


def resize(x: jax.Array, size: int | tuple[int, int], kind: str) -> jax.Array:
    """Resize NHWC `x` to `size` with the torch-exact `kind` ('area' or 'bicubic').

    Runs in float32 at full matmul precision: these resizes sit inside the VQ argmin, where
    TF32/bf16 rounding flips tokens.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    make = _MATRICES[kind]
    mh = jnp.asarray(make(in_h, out_h))
    mw = jnp.asarray(make(in_w, out_w))
    x = x.astype(jnp.float32)
    return jnp.einsum('oh,bhwc,pw->bopc', mh, x, mw, precision=jax.lax.Precision.HIGHEST)
