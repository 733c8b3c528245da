"""Class-conditional samples from a checkpoint: a labelled grid, coarse-to-fine strips, or an
ADM-format .npz of many images for FID.

    python -m var_jax.sample --checkpoint DIR --classes 207,360,387,974 --per_class 4 \\
        --cfg 4 --top_k 900 --top_p 0.95 --seed 0 --out grid.png
    python -m var_jax.sample --checkpoint DIR --classes 207,360 --progression --out strips.png
    python -m var_jax.sample --checkpoint DIR --all_classes --per_class 50 --preset official \\
        --npz samples.npz

DIR is a converted checkpoint (python -m var_jax.convert) or a training workdir (EMA weights of
its latest step unless --step); --dtype bfloat16 computes in bfloat16 (parameters stay float32).
--out writes the image format its suffix names (.png, .jpg, .webp, ...). An existing --out or
--npz file is replaced only with --force; the output path (its directory exists and is writable,
it is not a directory, the suffix is known) is checked before the model is loaded.

Sampling settings come from --preset, then from explicit flags (a flag beats the preset):

    official  cfg 1.5, top_k 900, top_p 0.96, no smoothing  VAR README FID protocol (default with --npz)
    paper     cfg 2.0, top_k 900, top_p 0.96, no smoothing  the paper's guidance (VAR issue #86)
    demo      cfg 4.0, top_k 900, top_p 0.95, no smoothing  demo_sample.ipynb (default for PNGs)

Image (class c, index i) uses the key fold_in(fold_in(key(seed), c), i): it depends on the seed,
the class and the index only, never on --batch_size or the device count, so a grid shows the
very images an .npz with the same settings holds.

--npz writes the ADM evaluator's format (openai/guided-diffusion `evaluations/evaluator.py`):
arr_0 = uint8 (N, H, W, 3), N = classes x per_class (50,000 for ImageNet with --all_classes
--per_class 50), and arr_1 = the labels, as guided-diffusion's own sampler stores them. Pixels
are round(255 x) of the [0, 1] image, what a PNG would hold. The images are stored in a seeded
random order, not sorted by class: ADM averages the Inception Score over consecutive splits of
5,000 images, so a class-sorted file would cap IS at 100 (FID does not depend on the order).
Batches are split over all devices. Finished chunks are kept in OUT.parts/ with a manifest of
the settings: re-running the same command after an interruption continues where it stopped
(other settings are refused), and the .npz is assembled atomically at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import sys
import time
import uuid
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax.io import checkpoint, outputs
from var_jax.sampling import generate
from var_jax.sampling.settings import (
    PRESETS,
    Settings,
    add_sampling_flags,
    class_names,
    parse_classes,
    resolve_settings,
    row_label,
)
from var_jax.utils import cli, metrics, viz

DEMO_CLASSES = (980, 437, 22, 562)  # demo_sample.ipynb: volcano, beacon, bald eagle, fountain
SAMPLES_FORMAT = 'var_jax.samples/1'
MANIFEST = 'manifest.json'


# ---------------------------------------------------------------------------- checkpoints, classes
@dataclasses.dataclass
class Checkpoint:
    path: epath.Path
    vq_cfg: object
    var_cfg: object
    meta: dict
    step: int | None  # training workdirs: the step loaded

    @property
    def num_classes(self) -> int:
        return self.var_cfg.num_classes

    @property
    def image_size(self) -> int:
        return self.vq_cfg.image_size

    def fingerprint(self) -> str:
        return hashlib.sha256((self.path / checkpoint.MODEL_FILE).read_bytes()).hexdigest()[:16]

    def load(self, dtype: str | None = None):
        """-> (vqvae, var); the parameters are read only now, after every cheap check passed.
        `dtype`: compute dtype of both models (None: as saved)."""
        return checkpoint.load_model(self.path, step=self.step, need_var=True, dtype=dtype)


def open_checkpoint(path: str, step: int | None = None) -> Checkpoint:
    """Read model.json only (fast); errors name the directory and what is wrong with it."""
    d = epath.Path(path)
    if not d.exists():
        raise ValueError(f'{path}: no such checkpoint directory')
    vq_cfg, var_cfg, meta = checkpoint.read_model_json(d)
    if var_cfg is None:
        raise ValueError(f'{path}: holds a tokenizer only; sampling needs a VAR checkpoint')
    if vq_cfg is None:
        raise ValueError(f'{path}: holds no tokenizer config')
    if (d / 'params').exists():
        if step is not None:
            raise ValueError(f'{path}: --step applies to training workdirs, this is a converted checkpoint')
    else:
        ckpts = d / checkpoint.CHECKPOINTS
        steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []
        if not steps:
            raise ValueError(f'{path}: no parameters (no params/ and no saved step in {checkpoint.CHECKPOINTS}/)')
        if step is not None and step not in steps:
            raise ValueError(f'{path}: no step {step}; saved steps: {", ".join(map(str, steps))}')
        step = steps[-1] if step is None else step
    return Checkpoint(d, vq_cfg, var_cfg, meta, step)


def _to_uint8(x):
    # viz.to_uint8 on device (4x less to copy back): clip(255 x + 0.5) truncated, i.e. rounded.
    return (jnp.clip(x, 0, 1) * 255 + 0.5).astype(jnp.uint8)


@nnx.jit(static_argnames=('progression',))
def _finish(vqvae, images, idx_list, progression: bool):
    frames = None
    if progression:  # decode the cumulative f_hat after every scale, all scales as one batch
        f_hats = vqvae.quantize.idx_to_fhat(idx_list, cumulative=True)
        b, k = images.shape[0], len(f_hats)
        x = (vqvae.decode(jnp.concatenate(f_hats)) + 1) / 2
        frames = _to_uint8(x.reshape((k, b) + x.shape[1:]).swapaxes(0, 1))  # (B, K, S, S, 3)
    return _to_uint8(images), frames


class Sampler:
    """(class, index) batches -> uint8 images, split over a 1-D mesh of devices.

    The model is replicated, labels and keys are split on the batch axis. The batch is rounded up
    to a multiple of the device count and short batches are padded, so one program is compiled
    per batch size. With `progression` it also returns each image decoded after every scale
    (from the sampled tokens: with --more_smooth the last frame is the unsmoothed image).
    """

    def __init__(self, var, vqvae, settings: Settings, seed: int, batch_size: int, devices=None,
                 progression: bool = False):
        devices = list(jax.devices() if devices is None else devices)
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.mesh = Mesh(np.asarray(devices, dtype=object), ('batch',))
        self.rows = NamedSharding(self.mesh, P('batch'))
        replicated = NamedSharding(self.mesh, P())
        for m in (var, vqvae):
            nnx.update(m, jax.device_put(nnx.state(m), replicated))
        self.var, self.vqvae, self.s, self.seed, self.progression = var, vqvae, settings, seed, progression

    def dispatch(self, labels: np.ndarray, index: np.ndarray):
        """Start one batch (asynchronously); `collect` waits for it."""
        n, pad = len(labels), self.batch_size - len(labels)
        labels = np.concatenate([labels, np.repeat(labels[:1], pad)]).astype(np.int32)
        index = np.concatenate([index, np.repeat(index[:1], pad)]).astype(np.int64)
        keys = jax.device_put(generate.image_keys(self.seed, labels, index), self.rows)
        s = self.s
        images, idx_list = generate.sample(self.var, self.vqvae, jax.device_put(labels, self.rows), keys,
                                           s.cfg, s.top_k, s.top_p, s.more_smooth)
        return n, _finish(self.vqvae, images, idx_list, self.progression)

    @staticmethod
    def collect(pending):
        n, (images, frames) = pending
        return np.asarray(images)[:n], None if frames is None else np.asarray(frames)[:n]

    def run(self, labels: np.ndarray, index: np.ndarray, progress):
        """Yield (start, images, frames) batch by batch, in order; one batch stays in flight on the
        devices while the previous one is copied back and stored."""
        pending = None
        for start in range(0, len(labels), self.batch_size):
            nxt = start, self.dispatch(labels[start:start + self.batch_size], index[start:start + self.batch_size])
            if pending is not None:
                yield self._done(pending, progress)
            pending = nxt
        if pending is not None:
            yield self._done(pending, progress)

    def _done(self, pending, progress):
        start, p = pending
        images, frames = self.collect(p)
        progress.update(len(images))
        return start, images, frames


def Progress(total: int, done: int = 0, desc: str = 'sampling'):  # noqa: N802
    return metrics.CountProgress(total, desc, done)


def file_order(classes, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, index within class) of every image of an .npz, in file order: a permutation seeded
    by `seed`, so consecutive 5,000-image splits mix all classes (ADM's Inception Score)."""
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    index = np.tile(np.arange(per_class, dtype=np.int64), len(classes))
    perm = np.random.default_rng(seed).permutation(len(labels))
    return labels[perm], index[perm]


# ---------------------------------------------------------------------------- outputs


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}'
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# ---------------------------------------------------------------------------- .npz with resume
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
            raise ValueError(f'{self.parts}/: unreadable {MANIFEST} ({e}); delete the directory to start over') from None
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
    progress = Progress(run.n, done)
    try:
        for start, images, _ in sampler.run(labels[pos], index[pos], progress):
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
        progress.close()
    run.assemble(labels)
    return True


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog='python -m var_jax.sample', description=__doc__.split('\n\n')[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--checkpoint', required=True, help='converted checkpoint or training workdir')
    p.add_argument('--step', type=int, help='training workdirs: the step to load (default: the latest)')
    what = p.add_argument_group('what to sample')
    what.add_argument('--classes', help='comma-separated class indices, e.g. 207,360,387,974 (default for PNGs: '
                                        f'{",".join(map(str, DEMO_CLASSES))} for 1000-class models, else the first '
                                        'eight classes; for --npz: all classes)')
    what.add_argument('--all_classes', action='store_true', help='every class of the model')
    what.add_argument('--per_class', type=int, help='images per class (default 4 for PNGs, 50 for --npz)')
    out = p.add_argument_group('output (one of)')
    out.add_argument('--out', help='image (PNG, or the format its suffix names: .jpg, .webp, ...): a grid, one row '
                                   'per class labelled with its index and name')
    out.add_argument('--npz', help='ADM sample batch (.npz) for FID, see below')
    out.add_argument('--progression', action='store_true',
                     help='with --out: one strip per image, the image decoded after each scale, coarse to fine')
    out.add_argument('--force', action='store_true',
                     help='overwrite an existing --out or --npz file (an interrupted run in its .parts/ continues '
                          'without it)')
    out.add_argument('--chunk_size', type=int, default=1000,
                     help='--npz: images per resumable part file (default 1000)')
    out.add_argument('--max_chunks', type=int, default=0, help=argparse.SUPPRESS)  # tests: stop early
    p.add_argument('--preset', choices=sorted(PRESETS),
                   help='sampling settings (default: official with --npz, demo for PNGs)')
    add_sampling_flags(p, '--preset')
    run = p.add_argument_group('devices')
    run.add_argument('--batch_size', type=int, default=64,
                     help='images per step over all devices, rounded up to a multiple of the device count '
                          '(default 64; lower it if memory runs out, e.g. for d36 at 512 px)')
    run.add_argument('--num_devices', type=int, help='use the first N devices (default: all)')
    return p


def _check_args(args: argparse.Namespace) -> None:
    if (args.out is None) == (args.npz is None):
        raise ValueError('give one output: --out grid.png or --npz samples.npz')
    if args.progression and args.npz:
        raise ValueError('--progression writes a PNG: use it with --out, not --npz')
    if args.npz and not args.npz.endswith('.npz'):
        raise ValueError(f'--npz must name a .npz file, got {args.npz}')
    if args.classes is not None and args.all_classes:
        raise ValueError('give --classes or --all_classes, not both')
    for name in ('per_class', 'batch_size', 'chunk_size', 'num_devices'):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f'--{name} must be >= 1, got {v}')
    if args.seed < 0:
        raise ValueError(f'--seed must be >= 0, got {args.seed}')
    if args.max_chunks < 0:
        raise ValueError('--max_chunks must be >= 0')


def _devices(n: int | None):
    devices = jax.devices()
    if jax.process_count() > 1:
        raise ValueError('multi-process sampling is not supported yet: run it on one host')
    if n is not None and n > len(devices):
        raise ValueError(f'--num_devices {n}: only {len(devices)} devices here')
    return devices[:n] if n else devices


def run(args: argparse.Namespace) -> int:
    """Every check that needs no parameters comes first: a bad input costs no model load."""
    _check_args(args)
    settings = resolve_settings(args, args.preset or ('official' if args.npz else 'demo'))
    ck = open_checkpoint(args.checkpoint, args.step)
    n_cls = ck.num_classes
    if args.all_classes or (args.classes is None and args.npz):
        classes = list(range(n_cls))
    elif args.classes is not None:
        classes = parse_classes(args.classes, n_cls)
    else:
        classes = list(DEMO_CLASSES) if n_cls == 1000 else list(range(min(n_cls, 8)))
    per_class = args.per_class or (50 if args.npz else 4)
    devices = _devices(args.num_devices)
    if args.out:  # before the model is loaded: a bad path must not cost a minute of sampling
        outputs.image_format(args.out)
        outputs.check_file_output(args.out, force=args.force)
    if args.npz:
        return sample_npz(args, ck, settings, classes, per_class, devices)
    return sample_png(args, ck, settings, classes, per_class, devices)


def sample_npz(args, ck: Checkpoint, settings: Settings, classes, per_class: int, devices) -> int:
    labels, index = file_order(classes, per_class, args.seed)
    manifest = dict(format=SAMPLES_FORMAT, model=ck.fingerprint(), step=ck.step, seed=args.seed,
                    per_class=per_class, num_images=len(labels), image_size=ck.image_size,
                    chunk_size=args.chunk_size, **dataclasses.asdict(settings), classes=classes)
    npz = NpzRun(args.npz, manifest, len(labels), args.chunk_size, ck.image_size)
    npz.check(args.force)
    vqvae, var = ck.load(args.dtype)
    sampler = Sampler(var, vqvae, settings, args.seed, args.batch_size, devices)
    t0 = time.perf_counter()
    if not write_npz(sampler, npz, labels, index, args.max_chunks):
        print(f'stopped after {args.max_chunks} chunk(s) (--max_chunks); run again to continue', file=sys.stderr)
        return 0
    print(f'wrote {args.npz}: {len(labels)} images of {ck.image_size}x{ck.image_size} '
          f'({settings.describe()}, seed {args.seed}) in {time.perf_counter() - t0:.0f} s', file=sys.stderr)
    return 0


def sample_png(args, ck: Checkpoint, settings: Settings, classes, per_class: int, devices) -> int:
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    index = np.tile(np.arange(per_class, dtype=np.int64), len(classes))
    names = class_names(ck.meta, ck.num_classes)
    vqvae, var = ck.load(args.dtype)
    sampler = Sampler(var, vqvae, settings, args.seed, args.batch_size, devices, progression=args.progression)
    images, frames = [], []
    progress = Progress(len(labels))
    try:
        for _, im, fr in sampler.run(labels, index, progress):
            images.append(im)
            frames.append(fr)
    finally:
        progress.close()
    if args.progression:
        strips = np.concatenate(frames)  # (N, K, S, S, 3): one row per image
        rows = [f'{row_label(c, names)} #{i}' for c, i in zip(labels, index)]
        png = viz.grid(strips.reshape((-1,) + strips.shape[2:]), len(labels), strips.shape[1], row_labels=rows)
    else:
        png = viz.grid(np.concatenate(images), len(classes), per_class,
                       row_labels=[row_label(c, names) for c in classes])
    outputs.save_image(args.out, png)
    print(f'wrote {args.out} ({settings.describe()}, seed {args.seed})', file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli.run(lambda: run(build_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
