"""Evaluation inputs, read and checked with numpy only (so bad inputs fail before JAX starts).

Sample and reference batches follow the ADM suite: an `.npz` whose `arr_0` holds uint8 NHWC RGB
images (N, H, W, 3); a reference batch also holds the precomputed Inception statistics `mu`,
`sigma` (pool_3, 2048-d) and `mu_s`, `sigma_s` (mixed_6/conv[..., :7], 17*17*7 = 2023-d).
A 50k x 256 x 256 x 3 batch is 9.8 GB, so images are streamed from the zip member in batches,
as ADM's `StreamingNpzArrayReader` does, instead of being loaded whole.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterator

import numpy as np

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
REF_BATCH_URL = ('https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/'
                 'VIRTUAL_imagenet256_labeled.npz')

POOL_DIM = 2048            # pool_3
SPATIAL_DIM = 17 * 17 * 7  # mixed_6/conv, first 7 channels, flattened (h, w, c)
STAT_SHAPES = {'mu': (POOL_DIM,), 'sigma': (POOL_DIM, POOL_DIM),
               'mu_s': (SPATIAL_DIM,), 'sigma_s': (SPATIAL_DIM, SPATIAL_DIM)}


def check_inception_path(path: str | os.PathLike) -> str:
    """The weights are never downloaded: a missing file is an error that says where to get it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f'{path}: Inception weights not found; download pt_inception-2015-12-05-6726825d.pth '
                         f'(pytorch-fid\'s port of the 2015 TF Inception graph ADM uses) from {FID_WEIGHTS_URL} '
                         'and pass its path')
    return path


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file')
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f'{path}: not an .npz file ({e})') from None


def _member_names(zf: zipfile.ZipFile) -> list[str]:
    return [n[:-4] for n in zf.namelist() if n.endswith('.npy')]


def _read_header(fh, path: str, key: str):
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fh)
    except ValueError as e:
        raise ValueError(f'{path}: {key} is not a valid .npy array ({e})') from None
    return None  # newer header versions: fall back to np.load


class NpzImages:
    """uint8 NHWC images under `key` of an npz, validated on open and streamed in batches."""

    def __init__(self, path: str | os.PathLike, key: str = 'arr_0', what: str = 'samples'):
        self.path, self.key = os.fspath(path), key
        with _open_zip(self.path) as zf:
            names = _member_names(zf)
            if key not in names:
                found = ', '.join(repr(n) for n in names) or 'nothing'
                raise ValueError(f'{self.path}: no array {key!r} in this npz (found {found}); {what} must be '
                                 f'saved as np.savez(path, {key}=images)')
            with zf.open(f'{key}.npy') as fh:
                header = _read_header(fh, self.path, key)
        if header is None:
            shape, fortran, dtype = self._load_all().shape, False, np.dtype(np.uint8)
        else:
            shape, fortran, dtype = header
        self.fortran = fortran
        if dtype != np.uint8:
            raise ValueError(f'{self.path}: {key} must be uint8 images (0..255, as decoded from PNG), got {dtype}')
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f'{self.path}: {key} must be N x H x W x 3 (NHWC RGB), got shape {tuple(shape)}')
        if shape[0] == 0:
            raise ValueError(f'{self.path}: {key} holds no images')
        self.shape = tuple(int(s) for s in shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def _load_all(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as z:
            return z[self.key]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (<= batch_size, H, W, 3) uint8 batches, in file order."""
        if self.fortran:  # rare (a transposed array was saved): no streaming
            arr = self._load_all()
            for i in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[i:i + batch_size])
            return
        n, per_image = self.shape[0], int(np.prod(self.shape[1:]))
        with _open_zip(self.path) as zf, zf.open(f'{self.key}.npy') as fh:
            _read_header(fh, self.path, self.key)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                raw = fh.read(b * per_image)
                if len(raw) != b * per_image:
                    raise ValueError(f'{self.path}: {self.key} is truncated (image {i + len(raw) // per_image} '
                                     f'of {n})')
                yield np.frombuffer(raw, np.uint8).reshape((b,) + self.shape[1:])


@dataclasses.dataclass
class Reference:
    """An ADM reference batch: precomputed statistics plus images for precision/recall."""
    images: NpzImages
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray


def read_reference(path: str | os.PathLike) -> Reference:
    path = os.fspath(path)
    with _open_zip(path) as zf:
        names = set(_member_names(zf))
    missing = [k for k in STAT_SHAPES if k not in names]
    if missing:
        raise ValueError(f'{path}: reference batch has no precomputed statistics ({", ".join(missing)} missing); '
                         f'use the ADM reference batch, e.g. {REF_BATCH_URL}')
    images = NpzImages(path, 'arr_0', what='reference images')
    stats = {}
    with np.load(path, allow_pickle=False) as z:
        for k, want in STAT_SHAPES.items():
            arr = z[k]
            if arr.shape != want or not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f'{path}: {k} must be a float array of shape {want}, got {arr.dtype} {arr.shape} '
                                 '(statistics from another feature extractor?)')
            if not np.all(np.isfinite(arr)):
                raise ValueError(f'{path}: {k} contains non-finite values')
            stats[k] = arr.astype(np.float64)
    return Reference(images=images, **stats)


def check_same_size(samples: NpzImages, ref: Reference) -> None:
    """ADM resizes any size to 299 and would silently compare 512-px samples with a 256-px reference."""
    if samples.image_size != ref.images.image_size:
        (h, w), (rh, rw) = samples.image_size, ref.images.image_size
        raise ValueError(f'{samples.path}: samples are {h}x{w} but the reference batch {ref.images.path} is '
                         f'{rh}x{rw}; use the reference batch of the sample resolution')
