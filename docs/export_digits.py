"""Export scikit-learn's bundled handwritten digits as a labelled image folder (docs/own_data.md).

The 1,797 8x8 drawings of the UCI "Optical Recognition of Handwritten Digits" set (43 writers,
grey levels 0..16) ship inside every scikit-learn wheel as sklearn/datasets/data/digits.csv.gz.
This reads them straight from the wheel (no install):

    pip download scikit-learn --no-deps -d /tmp/sk
    python docs/export_digits.py /tmp/sk/scikit_learn-*.whl digits/
    python -m var_jax.train --config=configs/folder.py --config.data.path=digits --workdir=runs/digits

and writes digits/<0..9>/<index>.png: 8x8 8-bit greyscale, white ink on black (v * 255 / 16), the
images as they are; the training pipeline resizes them to the run's size. Refuses to write into a
non-empty folder.
"""
from __future__ import annotations

import gzip
import io
import os
import sys
import zipfile

import numpy as np
from PIL import Image

MEMBER = 'sklearn/datasets/data/digits.csv.gz'


def read_digits(wheel: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 images (N, 8, 8), labels (N,)) from a scikit-learn wheel (or any zip holding MEMBER)."""
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read(MEMBER))
    table = np.loadtxt(io.BytesIO(raw), delimiter=',')
    images = np.round(table[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    return images, table[:, 64].astype(np.int64)


def export(wheel: str, out: str) -> int:
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f'{out} is not empty; give a new folder')
    images, labels = read_digits(wheel)
    for i, (im, y) in enumerate(zip(images, labels)):
        d = os.path.join(out, str(y))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(im, 'L').save(os.path.join(d, f'{i:04d}.png'))
    return len(labels)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit('usage: python docs/export_digits.py SCIKIT_LEARN_WHEEL OUT_DIR')
    try:
        n = export(sys.argv[1], sys.argv[2])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        sys.exit(f'error: {e}')
    print(f'wrote {n} images in 10 class folders under {sys.argv[2]}')
