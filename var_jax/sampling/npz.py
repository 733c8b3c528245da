"""ADM-format sample batches (.npz) for FID, written in resumable chunks.

arr_0 = uint8 (N, H, W, 3), the images, and arr_1 = their labels, as openai/guided-diffusion's own
sampler stores them (its `evaluations/evaluator.py` reads arr_0). Pixels are round(255 x) of the
[0, 1] image, what a PNG would hold. The images are stored in a seeded random order
(`file_order`), not sorted by class: ADM averages the Inception Score over consecutive splits of
5,000 images, so a class-sorted file would cap IS at 100 (FID does not depend on the order).

Finished chunks are kept in OUT.parts/ with a manifest of the settings: re-running the same
command after an interruption continues where it stopped (other settings are refused), and the
.npz is assembled atomically at the end, streamed part by part (memory stays at one chunk).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil
import sys
import time
import uuid
import zipfile

import numpy as np

from var_jax.io import outputs
from var_jax.io.checkpoint import Checkpoint
from var_jax.sampling.batch import Sampler, progress_bar
from var_jax.sampling.settings import Settings

SAMPLES_FORMAT = 'var_jax.samples/1'
MANIFEST = 'manifest.json'


def file_order(classes, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, index within class) of every image of an .npz, in file order: a permutation seeded
    by `seed`, so consecutive 5,000-image splits mix all classes (ADM's Inception Score)."""
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    index = np.tile(np.arange(per_class, dtype=np.int64), len(classes))
    perm = np.random.default_rng(seed).permutation(len(labels))
    return labels[perm], index[perm]


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}'
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class NpzRun:
    """Chunks of `chunk_size` images in `OUT.parts/part_NNNNN.npy`, then one streamed .npz."""

    def __init__(self, out: str, settings: dict, num_images: int, chunk_size: int, image_size: int):
        self.out = pathlib.Path(out)
        self.parts = self.out.parent / (self.out.name + '.parts')
        self.settings, self.n, self.chunk = settings, num_images, chunk_size
        self.shape = (image_size, image_size, 3)
        self.num_chunks = -(-num_images // chunk_size)

    def part(self, c: int) -> pathlib.Path:
        return self.parts / f'part_{c:05d}.npy'

    def chunk_len(self, c: int) -> int:
        return min(self.chunk, self.n - c * self.chunk)

    def check(self, force: bool) -> None:
        """Refuse what cannot be continued or written; writes nothing."""
        if not self.parts.exists():
            outputs.check_file_output(self.out, force=force, flag='--npz')
            return
        outputs.check_file_output(self.out, force=True, flag='--npz')  # an interrupted run may replace it
        try:
            theirs = json.loads((self.parts / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f'{self.parts}/: unreadable {MANIFEST} ({e}); delete the directory to start '
                             'over') from None
        diff = [f'{k} {theirs.get(k)!r} there, {v!r} now' for k, v in self.settings.items()
                if k != 'classes' and theirs.get(k) != v]
        if theirs.get('classes') != self.settings['classes']:
            diff.append('other classes')
        if diff:
            raise ValueError(f'{self.parts}/ holds an interrupted run with other settings ({"; ".join(diff)}); '
                             f're-run with the same settings to continue it, or delete {self.parts}/ to start over')

    def todo(self) -> list[int]:
        if not self.parts.exists():
            self.parts.mkdir(parents=True)
            _atomic_write(self.parts / MANIFEST, json.dumps(self.settings, indent=1).encode())
        missing = []
        for c in range(self.num_chunks):
            if not self.part(c).exists():
                missing.append(c)
                continue
            shape = self._load(c, mmap_mode='r').shape
            if shape != (self.chunk_len(c),) + self.shape:
                raise ValueError(f'{self.part(c)} holds {shape}, expected {(self.chunk_len(c),) + self.shape}; '
                                 f'delete {self.parts}/ to start over')
        return missing

    def _load(self, c: int, mmap_mode=None) -> np.ndarray:
        """A finished part; a damaged one (a full disk, a copy cut short) is named."""
        try:
            a = np.load(self.part(c), mmap_mode=mmap_mode, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f'{self.part(c)}: damaged part file ({" ".join(str(e).split())}); delete it to '
                             'sample that chunk again') from None
        if a.dtype != np.uint8:
            raise ValueError(f'{self.part(c)}: holds {a.dtype}, expected uint8; delete it to sample that chunk again')
        return a

    def write_part(self, c: int, images: np.ndarray) -> None:
        _atomic_write(self.part(c), _npy_bytes(images))

    def assemble(self, labels: np.ndarray) -> None:
        """Stream the parts into one .npz (uncompressed, as np.savez writes), rename it into place,
        then remove the parts. Memory stays at one chunk however large N is."""
        tmp = self.out.parent / f'.{self.out.name}.{uuid.uuid4().hex[:8]}'
        try:
            with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open('arr_0.npy', 'w', force_zip64=True) as fh:
                    np.lib.format.write_array_header_1_0(
                        fh, {'descr': '|u1', 'fortran_order': False, 'shape': (self.n,) + self.shape})
                    for c in range(self.num_chunks):
                        fh.write(np.ascontiguousarray(self._load(c)).data)
                zf.writestr('arr_1.npy', _npy_bytes(labels))
            os.replace(tmp, self.out)
        finally:
            if tmp.exists():
                tmp.unlink()
        shutil.rmtree(self.parts)


def write_npz(sampler: Sampler, run: NpzRun, labels: np.ndarray, index: np.ndarray, max_chunks: int = 0) -> bool:
    """Sample the missing chunks in file order and assemble; False if stopped by `max_chunks`."""
    todo = run.todo()
    done = run.n - sum(run.chunk_len(c) for c in todo)
    if todo and done:
        print(f'resuming: {run.num_chunks - len(todo)}/{run.num_chunks} chunks ({done} images) already in '
              f'{run.parts}/', file=sys.stderr)
    pos = np.concatenate([np.arange(c * run.chunk, c * run.chunk + run.chunk_len(c)) for c in todo]) if todo \
        else np.zeros((0,), np.int64)
    buffers, filled, written = {}, {}, 0
    bar = progress_bar(run.n, done)
    try:
        for start, images, _ in sampler.run(labels[pos], index[pos], bar):
            p = pos[start:start + len(images)]
            for c in np.unique(p // run.chunk):
                sel = p // run.chunk == c
                buf = buffers.setdefault(c, np.zeros((run.chunk_len(c),) + run.shape, np.uint8))
                buf[p[sel] - c * run.chunk] = images[sel]
                filled[c] = filled.get(c, 0) + int(sel.sum())
                if filled[c] == len(buf):
                    run.write_part(int(c), buffers.pop(c))
                    written += 1
            if max_chunks and written >= max_chunks:
                return False
    finally:
        bar.close()
    run.assemble(labels)
    return True


def sample_npz(ck: Checkpoint, settings: Settings, classes, per_class: int, *, out: str, seed: int, devices,
               batch_size: int, chunk_size: int, max_chunks: int = 0, force: bool = False,
               dtype: str | None = None) -> None:
    """`per_class` images of each class into the .npz `out`, continuing an interrupted run of the
    same settings; the model is loaded only after the output checks passed."""
    labels, index = file_order(classes, per_class, seed)
    manifest = dict(format=SAMPLES_FORMAT, model=ck.fingerprint(), step=ck.step, seed=seed,
                    per_class=per_class, num_images=len(labels), image_size=ck.image_size,
                    chunk_size=chunk_size, **dataclasses.asdict(settings), classes=classes)
    npz = NpzRun(out, manifest, len(labels), chunk_size, ck.image_size)
    npz.check(force)
    vqvae, var = ck.load(dtype)
    sampler = Sampler(var, vqvae, settings, seed, batch_size, devices, uint8=True)
    t0 = time.perf_counter()
    if not write_npz(sampler, npz, labels, index, max_chunks):
        print(f'stopped after {max_chunks} chunk(s) (--max_chunks); run again to continue', file=sys.stderr)
        return
    print(f'wrote {out}: {len(labels)} images of {ck.image_size}x{ck.image_size} '
          f'({settings.describe()}, seed {seed}) in {time.perf_counter() - t0:.0f} s', file=sys.stderr)
