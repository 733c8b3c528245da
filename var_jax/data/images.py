"""Any PIL image -> 8-bit RGB (or L), scaling 16-bit samples instead of clipping them.

PIL opens a 16-bit greyscale PNG as mode 'I;16' or 'I' (integers 0..65535), and its
`convert('RGB')` / `convert('L')` clip those values to 255: all but the darkest pixels turn white.
Here such images are scaled to 8 bits as round(v / 257) (65535 / 257 = 255 exactly, the inverse of
the 8 -> 16 bit expansion v * 257) before any other conversion. 16-bit RGB(A) PNGs need nothing:
PIL already reduces them to 8 bits per channel. Every reader of user images (var_jax.edit, the
training data pipeline) goes through these functions.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_WIDE_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')


def to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale -> 'L' (v / 257, rounded; 32-bit values clipped to 0..65535);
    float 'F' images are taken to be in [0, 1]; anything else is returned unchanged."""
    if im.mode in _WIDE_MODES:
        v = np.clip(np.asarray(im, np.int64), 0, 65535)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8), 'L')
    if im.mode == 'F':
        v = np.nan_to_num(np.asarray(im, np.float64), nan=0.0)
        return Image.fromarray(np.round(np.clip(v, 0, 1) * 255).astype(np.uint8), 'L')
    return im


def to_rgb8(im: Image.Image) -> Image.Image:
    """-> mode 'RGB', 8 bits per channel (alpha dropped, palettes expanded, 16-bit scaled)."""
    im = to_8bit(im)
    return im if im.mode == 'RGB' else im.convert('RGB')


def to_l8(im: Image.Image) -> Image.Image:
    """-> mode 'L' (8-bit luminance), for masks."""
    im = to_8bit(im)
    return im if im.mode == 'L' else im.convert('L')
