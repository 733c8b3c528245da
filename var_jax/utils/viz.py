"""Image grids as PNG (sample grids, coarse-to-fine strips, reconstruction grids)."""
from __future__ import annotations

import io
import uuid

import numpy as np
from etils import epath
from PIL import Image, ImageDraw


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (or uint8) -> uint8 NHWC."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def grid(images, rows: int, cols: int, *, row_labels=None, pad: int = 2, min_cell: int = 64) -> np.ndarray:
    """(rows*cols, H, W, 3) -> one uint8 image; small images are upscaled (nearest) to `min_cell`."""
    x = to_uint8(images)
    n, h, w, _ = x.shape
    if n != rows * cols:
        raise ValueError(f'grid of {rows}x{cols} needs {rows * cols} images, got {n}')
    scale = max(1, -(-min_cell // h))
    if scale > 1:
        x = x.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    label_w = 0
    if row_labels is not None:
        label_w = max(8 * max(len(t) for t in row_labels) + 8, 40)
    out = np.full((rows * (h + pad) + pad, label_w + cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), label_w + pad + c * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = x[i]
    if row_labels is not None:
        im = Image.fromarray(out)
        draw = ImageDraw.Draw(im)
        for r, t in enumerate(row_labels):
            draw.text((4, pad + r * (h + pad) + h // 2 - 6), str(t), fill=(0, 0, 0))
        out = np.asarray(im)
    return out


def save_png(path, image: np.ndarray) -> None:
    """Write atomically (temporary file, then rename): no partial PNG is ever left behind."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format='PNG')
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}'
    try:
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
