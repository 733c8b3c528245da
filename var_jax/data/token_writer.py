"""Encode a training set once with the frozen tokenizer, for VAR training without the encoder.

The library of `python -m var_jax.pretokenize` (`write_tokens`); `var_jax.data.tokens` reads
what it writes. Reads the training split of the config's data source (TFDS, image folder, built-in shapes10) and
writes, per readable image, `views` x (2 if config.data.hflip else 1) token records (format and
view numbering: var_jax/data/tokens.py): N deterministic crops of the official train resize
(shorter side to round(1.125 * res), Lanczos; the built-in data is used at its size), the first
one centred, each also flipped when the config flips. The VAR step then draws one view per image
per epoch, where on-the-fly training draws a fresh random crop: a fixed set of N crops is the
augmentation traded for the encoder's compute (docs/pretokenize.md).

The tokenizer is config.tokenizer.checkpoint (a converted official VQVAE or a tokenizer workdir),
else RUN/tokenizer of a `var_jax.train --workdir RUN` that trained one. Shards of `shard_size`
source images are written to a temporary file and renamed when complete, so a rerun with the same
arguments skips finished shards and redoes only the interrupted one; the manifest records the
tokenizer's fingerprint, image size, scales, views, the data source and, once all shards are
there, the counts. Encoding runs data-parallel over all local devices.
"""
from __future__ import annotations

import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from array_record.python import array_record_module
from flax import nnx

from var_jax.data import pipeline, tokens
from var_jax.io import checkpoint
from var_jax.parallel import sharding
from var_jax.training import configs, loop
from var_jax.utils import metrics


def resolve_tokenizer(config, workdir: str | None) -> str:
    if config.tokenizer.checkpoint:
        return str(config.tokenizer.checkpoint)
    if workdir:
        local = os.path.join(workdir, checkpoint.TOKENIZER_DIR)
        if os.path.exists(os.path.join(local, checkpoint.MODEL_FILE)):
            return local
        raise ValueError(f'--workdir {workdir} holds no trained tokenizer ({local}); give '
                         '--config.tokenizer.checkpoint')
    raise ValueError('no tokenizer: set --config.tokenizer.checkpoint (a converted VQVAE or a tokenizer workdir) '
                     'or --workdir of a var_jax.train run that trained one')


def _settings(config, vq_cfg, fingerprint, tokenizer_path, views, seed, shard_size, n, source) -> dict:
    """The manifest fields that define the tokens (a rerun must give the same to resume)."""
    d = config.data
    data = {'source': d.source, 'image_size': d.image_size, 'hflip': bool(d.hflip),
            'crop_ratio': 1.0 if d.source == 'builtin' else 1.125}
    if d.source == 'imagefolder':
        data['path'] = os.path.abspath(d.path)
    elif d.source == 'tfds':
        data.update(name=d.name, split=d.train_split, data_dir=d.get('data_dir') or '')
    flips = 2 if d.hflip else 1
    return {'format': tokens.FORMAT, 'tokenizer': tokens.tokenizer_block(vq_cfg, fingerprint),
            'tokenizer_path': tokenizer_path, 'data': data, 'crops': views, 'flips': flips, 'views': views * flips,
            'seed': seed, 'shard_size': shard_size, 'source_images': n, 'num_shards': max(1, -(-n // shard_size)),
            'token_dtype': tokens.token_dtype(vq_cfg.vocab_size).str, 'num_classes': int(source.num_classes),
            'class_names': list(getattr(source, 'class_names', ()) or ()),
            'record': 'L tokens (token_dtype) then label, view, index (3 x <i4); view = crop * flips + flipped'}


def _write_json(path: str, obj: dict) -> None:
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Views:
    """grain map: source index -> {'views': uint8 (V, res, res, 3) (V = 0 if unreadable), label, index}."""

    def __init__(self, source, res: int, crop_ratio: float, crops: int, hflip: bool, seed: int):
        self.source, self.res, self.mid = source, res, round(crop_ratio * res)
        self.crops, self.hflip, self.seed = crops, hflip, seed

    def __call__(self, i):
        i = int(i)
        rec = self.source[i]
        try:
            im = pipeline.decode(rec['image'])
        except Exception:  # noqa: BLE001  (any decoder failure means "unreadable", as in training)
            return {'views': np.zeros((0, self.res, self.res, 3), np.uint8), 'label': np.int32(-1), 'index': i}
        if min(im.size) != self.mid:
            im = pipeline.resize_shorter(im, self.mid)
        w, h = im.size
        out = []
        for c in range(self.crops):
            if c == 0:  # the official eval crop (pipeline.CenterCrop)
                x, y = (w - self.res) // 2, (h - self.res) // 2
            else:  # a position of the official random crop (pipeline.Augment), fixed by (seed, image, crop)
                rng = np.random.default_rng([self.seed, i, c])
                x, y = int(rng.integers(0, w - self.res + 1)), int(rng.integers(0, h - self.res + 1))
            arr = np.asarray(im.crop((x, y, x + self.res, y + self.res)), np.uint8)
            out.append(arr)
            if self.hflip:
                out.append(arr[:, ::-1])
        return {'views': np.stack(out), 'label': np.int32(rec['label']), 'index': i}


def make_encoder(vqvae, batch: int):
    """-> (encode(uint8 images (batch, S, S, 3)) -> int32 tokens (batch, L), padded batch size),
    jitted once, the batch split over all local devices."""
    mesh = sharding.make_mesh(data=-1, devices=jax.local_devices())
    n = mesh.devices.size
    batch = -(-batch // n) * n
    graphdef, params = nnx.split(vqvae)
    params = sharding.put(params, sharding.replicated(mesh))
    in_sh = sharding.batch_sharding(mesh, ndim=4)

    @jax.jit
    def fn(params, images):
        vq = nnx.merge(graphdef, params)
        idx_list, _ = vq.quantize.tokenize(vq.encode(loop.images_to_float(images)))  # as in var_task.encode_batch
        return jnp.concatenate(idx_list, axis=1)

    def encode(images: np.ndarray) -> np.ndarray:
        k = len(images)
        if k < batch:  # pad: one compiled shape
            images = np.concatenate([images, np.zeros((batch - k,) + images.shape[1:], images.dtype)])
        return np.asarray(fn(params, jax.device_put(images, in_sh)))[:k]

    return encode, batch


def _progress(done: int, total: int, shard: int, shards: int, t0: float, new: int) -> None:
    el = time.time() - t0
    rate = new / el if el > 0 and new > 0 else 0.0
    eta = metrics.fmt_time((total - done) / rate) if rate > 0 else '--:--'
    print(f'[pretokenize] image {done}/{total} ({100 * done / max(total, 1):.0f}%) | shard {shard}/{shards} | '
          f'{rate:.1f} img/s | eta {eta}', flush=True)


def write_tokens(config, out: str, *, views: int = 1, workdir: str | None = None, batch: int = 64,
                 shard_size: int = 4096, max_images: int = 0) -> dict:
    """Write (or finish) the token directory `out`; returns the final manifest."""
    if config.data.source == 'tokens':
        raise ValueError('pretokenize reads images: set --config.data.source to builtin, imagefolder or tfds')
    configs.check(config, 'var')
    if views < 1 or batch < 1 or shard_size < 1 or max_images < 0:
        raise ValueError('--views, --batch and --shard_size must be >= 1 and --max_images >= 0')
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f'--out {out} is a file, not a directory')
    tok_path = resolve_tokenizer(config, workdir)
    vqvae, _ = checkpoint.load_model(tok_path, tokenizer_only=True)
    vq_cfg = vqvae.config
    pns = tuple(config.model.patch_nums)
    if config.model.patch_nums and tuple(pns) != tuple(vq_cfg.patch_nums):
        raise ValueError(f'config.model.patch_nums {tuple(pns)} differ from the tokenizer\'s {vq_cfg.patch_nums}')
    if config.data.image_size != vq_cfg.image_size:
        raise ValueError(f'config.data.image_size is {config.data.image_size} but the tokenizer works on '
                         f'{vq_cfg.image_size}px images')
    source = pipeline.make_source(config.data, 'train')
    n = min(len(source), max_images) if max_images else len(source)
    fp = tokens.tokenizer_fingerprint(vq_cfg, nnx.state(vqvae, nnx.Param))
    want = _settings(config, vq_cfg, fp, tok_path, views, int(config.seed), shard_size, n, source)

    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, tokens.MANIFEST)
    if os.path.exists(mpath):
        have = tokens.read_manifest(out)
        diff = [k for k in want if k != 'tokenizer_path' and have.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise ValueError(f'--out {out} holds tokens made with other settings ({k}: {have.get(k)} there, '
                             f'{want[k]} now); give another --out or the same arguments to resume')
        if have.get('complete'):
            print(f'[pretokenize] {out} is complete ({have["images"]} images x {have["views"]} views); nothing to do',
                  flush=True)
            return have
    else:
        _write_json(mpath, {**want, 'complete': False})

    paths = tokens.shard_paths(out, want['num_shards'])
    for name in os.listdir(out):  # temporary shards of a run that was killed (ours: this naming only)
        if name.startswith('tokens-') and '.array_record.tmp-' in name:
            os.remove(os.path.join(out, name))
    todo = [s for s, p in enumerate(paths) if not os.path.exists(p)]
    if len(todo) < len(paths):
        print(f'[pretokenize] resuming: {len(paths) - len(todo)} of {len(paths)} shards already in {out}', flush=True)
    encode, padded = make_encoder(vqvae, batch)
    V, dtype = want['views'], np.dtype(want['token_dtype'])  # noqa: N806  (V views per image, as in data/tokens.py)
    make_views = Views(source, config.data.image_size, want['data']['crop_ratio'], views, bool(config.data.hflip),
                       int(config.seed))
    workers = int(config.data.get('workers', 0))
    t0, new = time.time(), 0
    last_print = t0
    done = n - sum(min(shard_size, n - s * shard_size) for s in todo)
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        ds = grain.MapDataset.range(lo, hi).map(make_views).to_iter_dataset()
        if workers > 0:
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
        tmp = f'{paths[s]}.tmp-{os.getpid()}'
        writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
        try:
            pend_img, pend_meta = [], []

            def flush():
                imgs = np.concatenate(pend_img)
                toks = np.concatenate([encode(imgs[a:a + padded]) for a in range(0, len(imgs), padded)])
                for row, (label, view, index) in zip(toks, pend_meta):
                    writer.write(tokens.encode_record(row, label, view, index, dtype))
                pend_img.clear()
                pend_meta.clear()

            for el in ds:
                for v in range(len(el['views'])):
                    pend_meta.append((int(el['label']), v, int(el['index'])))
                pend_img.append(el['views'])
                if len(pend_meta) >= padded:  # a multiple of V images per flush keeps records image-major
                    flush()
                done, new = done + 1, new + 1
                if time.time() - last_print > 30:
                    last_print = time.time()
                    _progress(done, n, s, len(paths), t0, new)
            if pend_meta:
                flush()
            writer.close()
            os.replace(tmp, paths[s])
        except BaseException:
            writer.close()
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        _progress(done, n, s + 1, len(paths), t0, new)

    records = sum(array_record_module.ArrayRecordReader(p).num_records() for p in paths)
    final = {**want, 'complete': True, 'records': records, 'images': records // V, 'skipped': n - records // V,
             'bytes': sum(os.path.getsize(p) for p in paths)}
    _write_json(mpath, final)
    print(f'[pretokenize] done: {out}: {final["images"]} images x {V} views = {records} records '
          f'({final["bytes"] / max(records, 1):.0f} bytes per view), {final["skipped"]} unreadable images skipped; '
          f'train with --config.data.source=tokens --config.data.path={out}', flush=True)
    return final
