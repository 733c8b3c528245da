"""Reconstruction metrics of a VQVAE tokenizer over a dataset: PSNR, LPIPS, rFID and per-scale
codebook usage (see docs/evaluation.md, "Tokenizer metrics").

Every image x (uint8) goes through  x / 127.5 - 1 -> encode -> multi-scale tokenize -> decode
(clamped to [-1, 1]) once; the reconstruction is then rounded to uint8 exactly as
`var_jax.sample` writes PNGs, and every metric compares the uint8 original with that uint8
reconstruction:

    PSNR        per image, 10 log10(255^2 / max(MSE, MSE_FLOOR)), MSE over all H*W*3 values;
                mean over images. The floor caps identical images at 100 dB
    LPIPS       VGG16 'lin' v0.1 (`models.perceptual.lpips`) on both images mapped to [-1, 1];
                mean over images
    rFID        Frechet distance between the Inception pool_3 statistics of the originals and of
                the reconstructions (the ADM suite's Inception port, statistics and sqrtm)
    usage       per scale: % of the V codes chosen at least once over the whole set; overall: %
                chosen at least once at any scale (the codebook is shared by all scales)
    perplexity  exp(entropy) of the code histogram, natural log; V when every code is equally used

One jitted program computes the reconstruction and all per-image metrics, data parallel over a
1-D mesh of local devices; the code histograms are summed on the devices per batch and
accumulated on the host in int64. Padding rows of the tail batch and rows that SafeSource filled
with a duplicate of a later image (`skipped` > 0, i.e. an unreadable file) are masked out of
everything, so each readable image counts exactly once.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import uuid
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax.data.pipeline import make_dataset
from var_jax.eval import adm
from var_jax.eval import inception as inception_net
from var_jax.eval.inception import InceptionV3
from var_jax.io import checkpoint
from var_jax.io.official import load_official
from var_jax.models import PATCH_NUMS, VQVAEConfig
from var_jax.models.perceptual import load_lpips_params, lpips
from var_jax.training import configs
from var_jax.utils import metrics

MSE_FLOOR = 255.0 ** 2 * 1e-10  # PSNR cap of 100 dB, the floor of the tokenizer trainer's eval/psnr
LPIPS_MIN_SIZE = 16  # VGG16 pools four times before relu5_3; smaller images leave it empty
PROTOCOL_IMAGES = 50000  # ImageNet val, what published rFIDs use
OFFICIAL_SUFFIXES = ('.pth', '.pt', '.bin', '.npz', '.safetensors')


# ---------------------------------------------------------------------------- metric functions
def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] float -> uint8, rounded half up: `var_jax.sample`'s conversion of (x + 1) / 2."""
    return (jnp.clip((x + 1) / 2, 0, 1) * 255 + 0.5).astype(jnp.uint8)


def psnr(sse, num_values: int) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images from their sums of squared differences."""
    mse = np.asarray(sse, np.float64) / num_values
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, MSE_FLOOR))


def perplexity(counts) -> np.ndarray:
    """exp(entropy) of each row of a histogram (..., V); 0 for an empty row."""
    c = np.asarray(counts, np.float64)
    total = c.sum(-1, keepdims=True)
    p = c / np.maximum(total, 1)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), -1)
    return np.where(total[..., 0] > 0, np.exp(ent), 0.0)


def usage(counts) -> dict[str, Any]:
    """Codebook statistics of per-scale hit counts (K, V)."""
    counts = np.asarray(counts, np.int64)
    used = (counts > 0).sum(1)
    pooled = counts.sum(0)
    v = counts.shape[1]
    return {'codes_used': used.tolist(), 'usage': (100.0 * used / v).tolist(),
            'codes_used_overall': int((pooled > 0).sum()), 'usage_overall': 100.0 * float((pooled > 0).mean()),
            'perplexity': perplexity(counts).tolist(), 'perplexity_overall': float(perplexity(pooled))}


def rfid(real_pool: np.ndarray, recon_pool: np.ndarray) -> float:
    """FID(originals, reconstructions) from pool features, with ADM's statistics and sqrtm."""
    return adm.frechet_distance(adm.statistics(real_pool), adm.statistics(recon_pool))


# ---------------------------------------------------------------------------- the device program
@functools.partial(jax.jit, static_argnums=0)
def _step(graphs, frozen, images, valid):
    # graphdefs are static and hashable, so every Reconstructor of the same models, batch shape and
    # devices shares one compiled program
    vq_graph, inc_graph = graphs
    vq = nnx.merge(vq_graph, frozen['vqvae'])
    x = images.astype(jnp.float32) / 127.5 - 1.0
    idx_list, f_hat = vq.quantize.tokenize(vq.encode(x))
    rec = to_uint8(vq.decode(f_hat))
    diff = rec.astype(jnp.float32) - images.astype(jnp.float32)
    w = valid.astype(jnp.int32)
    v = vq.config.vocab_size
    out = {'sse': jnp.sum(diff * diff, axis=(1, 2, 3)),
           # masked scatter-add: padding and duplicate rows add 0 to every code
           'counts': jnp.stack([jnp.zeros((v,), jnp.int32).at[idx].add(jnp.broadcast_to(w[:, None], idx.shape))
                                for idx in idx_list])}
    if 'lpips' in frozen:
        out['lpips'] = lpips(frozen['lpips'], x, rec.astype(jnp.float32) / 127.5 - 1.0)
    if inc_graph is not None:
        inc = nnx.merge(inc_graph, frozen['inception'])
        out['pool_real'] = inc.features(images)['pool']
        out['pool_recon'] = inc.features(rec)['pool']
    return out


class Reconstructor:
    """Per batch of uint8 images: reconstruction, per-image squared error, LPIPS and Inception
    features, and per-scale code histograms of the valid rows, as one program sharded over a
    1-D mesh of `devices` (default: the local ones). Batches are padded to `batch_size` (rounded
    up to a multiple of the device count), so one program is compiled."""

    def __init__(self, vqvae, batch_size: int = 128, lpips_params=None, inception: InceptionV3 | None = None,
                 devices=None):
        devices = list(jax.local_devices() if devices is None else devices)
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        cfg = vqvae.config
        self.image_size, self.patch_nums, self.vocab_size = cfg.image_size, tuple(cfg.patch_nums), cfg.vocab_size
        if lpips_params is not None and self.image_size < LPIPS_MIN_SIZE:
            raise ValueError(f'LPIPS needs images of at least {LPIPS_MIN_SIZE} px, this tokenizer makes '
                             f'{self.image_size} px')
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = Mesh(np.asarray(devices, dtype=object), ('batch',))
        self.data_sharding = NamedSharding(mesh, P('batch'))
        vq_graph, vq_state = nnx.split(vqvae)
        frozen: dict[str, Any] = {'vqvae': vq_state}
        inc_graph = None
        if inception is not None:
            inc_graph, frozen['inception'] = nnx.split(inception)
        if lpips_params is not None:
            frozen['lpips'] = lpips_params
        self.with_lpips, self.with_inception = lpips_params is not None, inception is not None
        self._graphs = (vq_graph, inc_graph)
        self._frozen = jax.device_put(frozen, NamedSharding(mesh, P()))

    def dispatch(self, images: np.ndarray, valid: np.ndarray | None = None):
        """Start one batch (<= batch_size images); returns a handle for `collect`. `valid`: rows to
        count (default all)."""
        images = np.asarray(images)
        n, s = len(images), self.image_size
        if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
            raise ValueError(f'images must be uint8 (B, {s}, {s}, 3) for this tokenizer, got {images.dtype} '
                             f'{images.shape}')
        if n > self.batch_size:
            raise ValueError(f'batch of {n} images exceeds batch_size {self.batch_size}')
        valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        pad = self.batch_size - n
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        out = _step(self._graphs, self._frozen, jax.device_put(images, self.data_sharding),
                    jax.device_put(valid, self.data_sharding))
        return n, valid, out

    @staticmethod
    def collect(handle) -> dict[str, np.ndarray]:
        """Host results of one batch: per-image arrays of the valid rows only, and `counts` (K, V)."""
        _, valid, out = handle
        res = {k: np.asarray(a)[valid] for k, a in out.items() if k != 'counts'}
        res['counts'] = np.asarray(out['counts'], np.int64)
        return res


# ---------------------------------------------------------------------------- the dataset loop
def _as_batch(batch) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(batch, Mapping):  # a `data.pipeline` batch
        images = np.asarray(batch['image'])
        skipped = np.asarray(batch.get('skipped', np.zeros(len(images), np.int32)))
        return images, skipped
    images = np.asarray(batch)
    return images, np.zeros(len(images), np.int32)


def evaluate(vqvae, batches: Iterable, *, lpips_params=None, inception: InceptionV3 | None = None,
             batch_size: int = 128, max_images: int | None = None, total: int | None = None, devices=None,
             reconstructor: Reconstructor | None = None, desc: str = 'reconstructing') -> dict[str, Any]:
    """Reconstruction metrics of `vqvae` over `batches`.

    `batches`: uint8 (B, S, S, 3) arrays, or `data.pipeline` batches ({'image', 'skipped', ...}),
    whose rows with `skipped` > 0 stand in for an unreadable file and are left out (and counted).
    `max_images` stops after that many rows (readable or not); `total` sizes the progress bar.
    LPIPS and rFID are computed only with `lpips_params` / `inception` given (else None).
    Returns the summary numbers (see `summary`) plus `counts` (K, V) int64 and `per_image`
    PSNR / LPIPS arrays in data order.
    """
    rec = reconstructor or Reconstructor(vqvae, batch_size, lpips_params, inception, devices)
    if max_images is not None and max_images < 1:
        raise ValueError(f'max_images must be >= 1, got {max_images}')
    k, v = len(rec.patch_nums), rec.vocab_size
    counts = np.zeros((k, v), np.int64)
    parts: dict[str, list] = {'sse': [], 'lpips': [], 'pool_real': [], 'pool_recon': []}
    read = skipped = 0
    bar = metrics.CountProgress(total if total is not None else (max_images or 0), desc)

    def collect(handle):
        res = rec.collect(handle)
        nonlocal counts
        counts += res.pop('counts')
        for key, arr in res.items():
            parts[key].append(arr)
        bar.update(handle[0])

    def chunks():
        nonlocal read, skipped
        for batch in batches:
            images, skip = _as_batch(batch)
            if max_images is not None:
                images, skip = images[:max_images - read], skip[:max_images - read]
            for i in range(0, len(images), rec.batch_size):
                yield images[i:i + rec.batch_size], skip[i:i + rec.batch_size] == 0
            read += len(images)
            skipped += int(np.sum(skip > 0))
            if max_images is not None and read >= max_images:
                return

    try:  # one batch runs while the next is decoded on the host
        adm.overlapped(chunks(), lambda batch: rec.dispatch(*batch), collect)
    finally:
        bar.close()

    n = int(sum(len(a) for a in parts['sse']))
    if n == 0:
        raise ValueError(f'no readable images to evaluate ({read} read, {skipped} unreadable)')
    expected = n * np.array([p * p for p in rec.patch_nums], np.int64)
    if not (counts.sum(1) == expected).all():  # the row mask lost or leaked tokens
        raise RuntimeError(f'code counts per scale {counts.sum(1)} != {n} images x tokens per scale')
    per_image = {'psnr': psnr(np.concatenate(parts['sse']), rec.image_size ** 2 * 3)}
    if rec.with_lpips:
        per_image['lpips'] = np.concatenate(parts['lpips']).astype(np.float64)
    fid = None
    if rec.with_inception:
        if n < 2:
            raise ValueError('rFID needs at least 2 images')
        if n != PROTOCOL_IMAGES:
            print(f'note: rFID over {n} images; published rFIDs use the {PROTOCOL_IMAGES:,} ImageNet val images '
                  '(FID is biased upwards at small N)', file=sys.stderr)
        print('computing rFID (scipy sqrtm of a 2048x2048 matrix; up to a minute on a small CPU)', file=sys.stderr)
        fid = rfid(np.concatenate(parts['pool_real']), np.concatenate(parts['pool_recon']))
    return {'images': n, 'skipped': skipped, 'image_size': rec.image_size, 'patch_nums': list(rec.patch_nums),
            'vocab_size': v, 'psnr': float(per_image['psnr'].mean()),
            'lpips': float(per_image['lpips'].mean()) if 'lpips' in per_image else None,
            'rfid': fid, **usage(counts), 'counts': counts, 'per_image': per_image}


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able numbers of `evaluate`'s result (no histograms or per-image arrays)."""
    return {k: v for k, v in results.items() if k not in ('counts', 'per_image')}


def format_results(results: Mapping[str, Any]) -> str:
    def per_scale(xs, fmt):
        return '/'.join(format(x, fmt) for x in xs)

    lines = [f'images: {results["images"]} ({results["skipped"]} unreadable skipped)',
             f'PSNR: {results["psnr"]:.4f}']
    if results.get('lpips') is not None:
        lines.append(f'LPIPS: {results["lpips"]:.5f}')
    if results.get('rfid') is not None:
        lines.append(f'rFID: {results["rfid"]:.4f}')
    lines.append(f'usage: {per_scale(results["usage"], ".1f")} % (per scale), '
                 f'{results["usage_overall"]:.1f} % overall')
    lines.append(f'perplexity: {per_scale(results["perplexity"], ".1f")} (per scale), '
                 f'{results["perplexity_overall"]:.1f} overall (of {results["vocab_size"]} codes)')
    return '\n'.join(lines)


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Temporary sibling, then rename: an error never leaves a partial file under `path`."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}')
    try:
        with open(tmp, 'w') as fh:
            json.dump(payload, fh, indent=1)
            fh.write('\n')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------- CLI helpers
def is_official_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(OFFICIAL_SUFFIXES)


def tokenizer_config(path: str, image_size: int | None) -> tuple[VQVAEConfig | None, tuple[int, ...] | None]:
    """(config of a var_jax checkpoint or workdir, None) or (None, patch_nums for an official
    file), after checking that `image_size` fits. Reads model.json only; no weights."""
    if is_official_file(path):
        size = 256 if image_size is None else image_size
        if size not in PATCH_NUMS:
            raise ValueError(f'--image_size {size}: an official VAR tokenizer file runs at '
                             f'{" or ".join(map(str, sorted(PATCH_NUMS)))} px (the official scale sets '
                             f'{", ".join(str(PATCH_NUMS[s]) for s in sorted(PATCH_NUMS))})')
        return None, PATCH_NUMS[size]
    if os.path.isfile(path):
        raise ValueError(f'--tokenizer {path}: not a var_jax checkpoint directory or training workdir, nor an '
                         f'official tokenizer file ({", ".join(OFFICIAL_SUFFIXES)})')
    cfg = checkpoint.read_model_json(path)[0]
    if cfg is None:
        raise ValueError(f'{path}: holds no tokenizer config (a VAR-only checkpoint?)')
    check_image_size(cfg, image_size)
    return cfg, None


def check_image_size(cfg: VQVAEConfig, image_size: int | None) -> None:
    """The quantizer adds every scale's codes back on the full latent grid, whose side is the last
    patch_num, so a tokenizer reconstructs exactly one image size."""
    if image_size is None or image_size == cfg.image_size:
        return
    d, pn = cfg.downsample, cfg.patch_nums[-1]
    why = (f'{image_size} is not a multiple of its downsampling factor {d}' if image_size % d else
           f'{image_size} px gives a {image_size // d}x{image_size // d} latent')
    raise ValueError(f'--image_size {image_size} does not fit this tokenizer: its last scale is {pn}x{pn} tokens '
                     f'on the full latent grid and it downsamples by {d}, so it takes {cfg.image_size} px images '
                     f'only ({why})')


def load_tokenizer(path: str, image_size: int | None):
    """The VQVAE of a var_jax checkpoint / workdir or an official file, checked against image_size."""
    cfg, patch_nums = tokenizer_config(path, image_size)
    if cfg is None:
        vqvae, _ = load_official(path, patch_nums=patch_nums)
        check_image_size(vqvae.config, image_size if image_size is not None else vqvae.config.image_size)
        return vqvae
    return checkpoint.load_model(path, tokenizer_only=True)[0]  # a VAR checkpoint carries its tokenizer


def data_config(spec: str, image_size: int, data_dir: str | None = None, workers: int = 0):
    """`builtin`, `tfds:NAME:SPLIT` or an image folder -> a `data.pipeline` config for `image_size`."""
    if spec == 'builtin':
        return configs.data_config(source='builtin', image_size=image_size, workers=0)
    if spec.startswith('tfds:'):
        name, split = parse_tfds(spec)
        return configs.data_config(source='tfds', name=name, eval_split=split, data_dir=data_dir or '',
                                   image_size=image_size, workers=workers)
    return configs.data_config(source='imagefolder', path=spec, eval_path=spec, image_size=image_size, workers=workers)


def parse_tfds(spec: str) -> tuple[str, str]:
    """'tfds:NAME[:VERSION]:SPLIT[slice]' -> (name, split); the split may hold ':' in a slice."""
    rest = spec[len('tfds:'):]
    head = rest.split('[', 1)[0]
    i = head.rfind(':')
    name, split = (rest[:i], rest[i + 1:]) if i >= 0 else (rest, '')
    if not name or not split:
        raise ValueError(f'--data {spec}: expected tfds:NAME:SPLIT, e.g. tfds:imagenet2012:validation')
    return name, split


def run(tokenizer: str, data: str, *, image_size: int | None = None, max_images: int | None = None,
        inception: str | None = None, lpips_weights: str | None = None, batch_size: int = 128,
        data_dir: str | None = None, workers: int = 0) -> dict[str, Any]:
    """The CLI's work: check what can be checked cheaply, then load, build the pipeline, evaluate."""
    cfg, _ = tokenizer_config(tokenizer, image_size)
    size = cfg.image_size if cfg is not None else image_size or 256
    n_dev = len(jax.local_devices())
    local_batch = -(-batch_size // n_dev) * n_dev
    ds, source = make_dataset(data_config(data, size, data_dir, workers), split='eval', local_batch=local_batch,
                              seed=0, train=False)
    total = len(source) if max_images is None else min(max_images, len(source))
    lp = None
    if size >= LPIPS_MIN_SIZE:
        lp = load_lpips_params(lpips_weights or '')
    else:
        print(f'note: LPIPS needs images of at least {LPIPS_MIN_SIZE} px; not computed at {size} px',
              file=sys.stderr)
    if inception is None:
        print('note: no --inception weights given, so rFID is not computed', file=sys.stderr)
    vqvae = load_tokenizer(tokenizer, image_size)
    inc = inception_net.load_inception(inception) if inception is not None else None
    print(f'{total} images at {size} px, tokenizer V={vqvae.config.vocab_size} patch_nums={vqvae.config.patch_nums}, '
          f'{n_dev} device(s), batch {local_batch}', file=sys.stderr)
    results = evaluate(vqvae, ds, lpips_params=lp, inception=inc, batch_size=local_batch, max_images=max_images,
                       total=total)
    return {'tokenizer': tokenizer, 'data': data, **results}
