"""Pixel formats: any PIL image -> 8-bit RGB, without silently wrong values.

PIL's own `convert('RGB')` clips 16-bit and 32-bit integer images (modes I;16*, I) to 255, so a
16-bit PNG trained as an almost white image. Here they are scaled: v8 = round(v16 / 257), which
maps 0 -> 0 and 65535 -> 255 exactly (255 * 257 = 65535). Every other mode goes through
`convert('RGB')` as before (palette, grey, CMYK, alpha dropped), so 8-bit images are unchanged.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer grey images -> 8-bit grey ('L', scaled by 1/257); others unchanged."""
    if im.mode not in SIXTEEN_BIT_MODES:
        return im
    v = np.asarray(im).astype(np.float32)  # I;16 arrays are uint16, I arrays int32 (16-bit data)
    return Image.fromarray(np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8), 'L')


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB (16-bit grey scaled, not clipped)."""
    return to_8bit(im).convert('RGB')
