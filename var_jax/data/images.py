"""Any PIL image -> 8-bit RGB (or L), scaling 16-bit samples instead of clipping them.

PIL opens a 16-bit greyscale PNG as mode 'I;16' or 'I' (integers 0..65535), and its
`convert('RGB')` / `convert('L')` clip those values to 255: all but the darkest pixels turn white.
Here such images are scaled to 8 bits as round(v / 257) (65535 / 257 = 255 exactly, the inverse of
the 8 -> 16 bit expansion v * 257) before any other conversion. 16-bit RGB(A) PNGs need nothing:
PIL already reduces them to 8 bits per channel. Every reader of user images (var_jax.edit, the
training data pipeline) goes through these functions. `load_image_and_mask` reads the input of
zero-shot editing: both fitted to the model's resolution by the same centred crop.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

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


def read_image(path: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not halfway through the edit
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f'{path}: cannot read the {what} ({e})') from None


def fit(im: Image.Image, size: int, resample) -> np.ndarray:
    """Largest centred square, resized to size x size."""
    return np.asarray(ImageOps.fit(im, (size, size), method=resample, centering=(0.5, 0.5)))


def load_image_and_mask(image_path: str, mask_path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> image (S, S, 3) float32 in [0, 1] (Lanczos), mask (S, S) float64 in [0, 1] (1 = white; box
    filter, so a mask pixel keeps its place on the image). The mask must have the image's size."""
    image, mask = read_image(image_path, 'image'), read_image(mask_path, 'mask')
    if mask.size != image.size:
        raise ValueError(f'{mask_path}: the mask is {mask.size[0]}x{mask.size[1]} but the image is '
                         f'{image.size[0]}x{image.size[1]}; they must have the same size')
    rgb = fit(to_rgb8(image), size, Image.Resampling.LANCZOS).astype(np.float32) / 255  # 16-bit: scaled
    m = fit(to_l8(mask), size, Image.Resampling.BOX).astype(np.float64) / 255
    return rgb, m
