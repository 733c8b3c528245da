"""`shapes10`: a built-in, procedurally generated, class-conditional image dataset (no download).

Ten classes that differ in *shape and structure*, never only in colour:

    0 disc        1 square      2 triangle    3 ring        4 plus
    5 h-stripes   6 v-stripes   7 checker     8 two-dots    9 x-cross

Every image draws, independently of its class: background colour and texture (flat, linear
gradient or smooth noise), foreground colour (kept apart from the background in luminance so the
object is visible), object position, size and (for most classes) rotation, stripe/checker period,
and mild pixel noise. Colour therefore carries no class information, and a model has to learn
geometry: where edges are, how many parts an object has, what symmetry it has.

Images are a pure function of (split, index): `train` has 10,000 (1,000 per class), `test` 1,000
held-out images drawn from disjoint random streams. Generation is vectorised numpy; the whole train
split takes about a second and 30 MB at 32x32.
"""
from __future__ import annotations

import functools

import numpy as np

CLASS_NAMES = ('disc', 'square', 'triangle', 'ring', 'plus', 'h-stripes', 'v-stripes', 'checker',
               'two-dots', 'x-cross')
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {'train': (10_000, 0), 'test': (1_000, 1)}  # size, stream id


def _luma(c):
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _background(rng, n):
    base = rng.uniform(0, 1, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    if kind == 0:  # flat
        field = np.zeros((n, n))
    elif kind == 1:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        field = (np.cos(a) * xx + np.sin(a) * yy - 0.5) * rng.uniform(0.3, 0.8)
    else:  # smooth noise: a few random low-frequency waves
        field = sum(rng.uniform(0.05, 0.15)
                    * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * (np.cos(t) * xx + np.sin(t) * yy))
                             + rng.uniform(0, 2 * np.pi))
                    for t in rng.uniform(0, np.pi, 3))
    tint = rng.uniform(-0.2, 0.2, 3)
    img = base[None, None] + field[..., None] * (1 + tint)[None, None]
    return np.clip(img, 0, 1), base


def _foreground_colour(rng, bg):
    for _ in range(20):
        c = rng.uniform(0, 1, 3)
        if abs(_luma(c) - _luma(bg)) > 0.3:
            return c
    return np.where(_luma(bg) > 0.5, 0.05, 0.95) * np.ones(3)


def _mask(cls: int, rng, n: int) -> np.ndarray:
    """Soft (anti-aliased) object mask in [0, 1] for class `cls`."""
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    size = rng.uniform(0.28, 0.42)  # half-extent, as a fraction of the image
    cx, cy = rng.uniform(0.5 - (0.5 - size) * 0.8, 0.5 + (0.5 - size) * 0.8, 2)
    # free rotation, except where rotating would turn one class into another (plus vs x-cross)
    a = {4: rng.uniform(-0.25, 0.25), 9: np.pi / 4 + rng.uniform(-0.25, 0.25),
         7: rng.uniform(-0.35, 0.35)}.get(cls, rng.uniform(0, 2 * np.pi))
    u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / size  # rotated, normalised coordinates
    v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / size
    px = 1.5 / (n * size)  # one pixel in normalised units, for anti-aliasing

    def inside(d):  # signed distance (negative inside) -> soft mask
        return np.clip(0.5 - d / px, 0, 1)

    r = np.hypot(u, v)
    if cls == 0:  # disc
        return inside(r - 1)
    if cls == 1:  # square
        return inside(np.maximum(abs(u), abs(v)) - 0.85)
    if cls == 2:  # equilateral triangle
        k = np.sqrt(3)
        d = np.maximum.reduce([-v - 0.5, (k * u + v) / 2 - 0.5, (-k * u + v) / 2 - 0.5])
        return inside(d * 1.1)
    if cls == 3:  # ring
        w = rng.uniform(0.25, 0.4)
        return inside(abs(r - (1 - w / 2)) - w / 2)
    if cls == 4:  # plus
        w = rng.uniform(0.25, 0.35)
        return inside(np.minimum(np.maximum(abs(u) - w, abs(v) - 1), np.maximum(abs(v) - w, abs(u) - 1)))
    if cls in (5, 6):  # stripes inside a rounded box; rotation limited to keep h vs v distinct
        a2 = rng.uniform(-0.3, 0.3)
        s = ((yy - cy) * np.cos(a2) - (xx - cx) * np.sin(a2) if cls == 5
             else (xx - cx) * np.cos(a2) + (yy - cy) * np.sin(a2))
        period = rng.uniform(0.14, 0.22)
        stripes = np.clip(0.5 + np.cos(2 * np.pi * s / period) * n * period / 4, 0, 1)
        box = inside(np.maximum(abs(xx - cx), abs(yy - cy)) / size - 1.1)
        return stripes * box
    if cls == 7:  # checkerboard patch of 3x3 or 4x4 cells
        cells = rng.integers(3, 5)
        cu, cv = np.floor((u + 1) * cells / 2), np.floor((v + 1) * cells / 2)
        chk = (cu + cv) % 2 == 0
        return chk * inside(np.maximum(abs(u), abs(v)) - 1.0)
    if cls == 8:  # two dots
        d1 = np.hypot(u - 0.55, v) - 0.42
        d2 = np.hypot(u + 0.55, v) - 0.42
        return inside(np.minimum(d1, d2))
    if cls == 9:  # x-cross: thinner, longer arms, turned 45 degrees (see the rotation above)
        w = rng.uniform(0.18, 0.26)
        return inside(np.minimum(np.maximum(abs(u) - w, abs(v) - 1.1), np.maximum(abs(v) - w, abs(u) - 1.1)))
    raise ValueError(cls)


def render(split: str, index: int, size: int = 32) -> tuple[np.ndarray, int]:
    """Image `index` of `split` as (uint8 (size, size, 3), label)."""
    n, stream = SPLITS[split]
    if not 0 <= index < n:
        raise IndexError(f'shapes10/{split} has {n} images, index {index}')
    label = index % NUM_CLASSES
    rng = np.random.default_rng([20241123, stream, index])
    bg, base = _background(rng, size)
    fg = _foreground_colour(rng, base)
    m = _mask(label, rng, size)[..., None]
    img = bg * (1 - m) + fg[None, None] * m
    img = img + rng.normal(0, rng.uniform(0.0, 0.03), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


@functools.lru_cache(maxsize=4)
def load(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as (images uint8 (N, size, size, 3), labels int32 (N,)), cached."""
    if split not in SPLITS:
        raise ValueError(f'shapes10 has splits {sorted(SPLITS)}, not {split!r}')
    n = SPLITS[split][0]
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        images[i], labels[i] = render(split, i, size)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
