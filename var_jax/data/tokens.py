"""Pre-tokenized training data: the frozen tokenizer's per-scale token indices, stored once.

`python -m var_jax.pretokenize` (`var_jax.data.token_writer`) writes a directory read here
(`config.data.source='tokens'`, `config.data.path=DIR`), so that VAR training skips the VQVAE
encoder in every step:

    DIR/manifest.json                        what made the tokens (below) and, once complete, counts
    DIR/tokens-00000-of-00042.array_record   shard s: source images [s * shard_size, (s + 1) * shard_size)

Every readable source image i has `views` consecutive records (unreadable images have none and
are counted in the manifest), record = view v of image i:

    tokens  L little-endian int16 (int32 when the vocabulary exceeds 32767), scales in order,
            row-major within a scale (the order of `quantize.tokenize`)
    label, view, index   three little-endian int32 (`index` = position in the source dataset)

A view is one crop of the official train resize (shorter side to round(1.125 * res), Lanczos):
view c * F + f is crop c (c = 0: the centre crop, c > 0: a crop at a position drawn from
(seed, index, c)), flipped when f = 1 (F = 2 when the config flips, else 1). Training draws one
view per image per epoch, so an epoch is still one pass over the images.

The manifest's `tokenizer` block (patch_nums, vocab_size, image_size and a fingerprint: sha256 of
the tokenizer config and every parameter's bytes) must match the tokenizer of the training run.
"""
from __future__ import annotations

import hashlib
import json
import os

import grain
import numpy as np

MANIFEST = 'manifest.json'
FORMAT = 'var_jax.tokens/1'
SHARD_PATTERN = 'tokens-{:05d}-of-{:05d}.array_record'
META_FIELDS = 3  # label, view, index (int32 each) after the tokens


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype('<i2') if vocab_size <= np.iinfo(np.int16).max + 1 else np.dtype('<i4')


def tokenizer_fingerprint(vq_cfg, params) -> str:
    """sha256 over the tokenizer config and its parameters (path, shape, dtype, bytes), 16 hex digits."""
    import jax  # noqa: PLC0415  (the data pipeline, grain workers included, runs without JAX)

    h = hashlib.sha256(json.dumps(vq_cfg.to_dict(), sort_keys=True).encode())
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f'{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape}'.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def tokenizer_block(vq_cfg, fingerprint: str) -> dict:
    return {'fingerprint': fingerprint, 'patch_nums': list(vq_cfg.patch_nums), 'vocab_size': vq_cfg.vocab_size,
            'image_size': vq_cfg.image_size, 'L': int(sum(p * p for p in vq_cfg.patch_nums))}


def encode_record(tokens: np.ndarray, label: int, view: int, index: int, dtype: np.dtype) -> bytes:
    return tokens.astype(dtype).tobytes() + np.asarray([label, view, index], '<i4').tobytes()


def decode_record(rec: bytes, length: int, dtype: np.dtype) -> tuple[np.ndarray, int, int, int]:
    """-> (tokens (L,) of `dtype`, label, view, source index)."""
    toks = np.frombuffer(rec, dtype, count=length)
    label, view, index = np.frombuffer(rec, '<i4', count=META_FIELDS, offset=length * dtype.itemsize)
    return toks, int(label), int(view), int(index)


def read_manifest(path: str) -> dict:
    f = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ValueError(f'token directory {path!r} does not exist (make it with python -m var_jax.pretokenize)')
    if not os.path.exists(f):
        raise ValueError(f'{path!r} holds no {MANIFEST}: not a token directory of python -m var_jax.pretokenize')
    try:
        m = json.loads(open(f).read())
    except json.JSONDecodeError as e:
        raise ValueError(f'{f}: corrupt ({e})') from None
    if m.get('format') != FORMAT:
        raise ValueError(f'{f}: unknown format {m.get("format")!r} (expected {FORMAT})')
    return m


def shard_paths(path: str, num_shards: int) -> list[str]:
    return [os.path.join(path, SHARD_PATTERN.format(s, num_shards)) for s in range(num_shards)]


def check_matches(manifest: dict, vq_cfg, fingerprint: str | None, where: str) -> None:
    """Raise ValueError naming what differs between the tokens' tokenizer and this run's.
    `fingerprint` None (a dry run, no weights) checks the shapes only."""
    t = manifest['tokenizer']
    want = tokenizer_block(vq_cfg, fingerprint or t['fingerprint'])
    for key in ('patch_nums', 'vocab_size', 'image_size', 'fingerprint'):
        if t[key] != want[key]:
            raise ValueError(f'the tokens in {where} were made by another tokenizer: {key} {t[key]} there, '
                             f'{want[key]} for this run (set config.tokenizer.checkpoint to the tokenizer '
                             'that made them, or pretokenize again)')


class TokenSource:
    """A complete token directory as a random-access source of *images*: element i -> image i's
    records i * views ... i * views + views - 1 (read by `PickView`)."""

    def __init__(self, path: str):
        m = read_manifest(path)
        if not m.get('complete'):
            done = sum(os.path.exists(p) for p in shard_paths(path, m['num_shards']))
            raise ValueError(f'the tokens in {path!r} are incomplete ({done} of {m["num_shards"]} shards); run '
                             'python -m var_jax.pretokenize again with the same arguments to finish them')
        self.path, self.manifest = path, m
        self.views, self.length = int(m['views']), int(m['tokenizer']['L'])
        self.dtype = np.dtype(m['token_dtype'])
        self.num_classes, self.class_names = int(m['num_classes']), tuple(m.get('class_names') or ())
        self.records = grain.sources.ArrayRecordDataSource(shard_paths(path, m['num_shards']))
        n = len(self.records)
        if n != m['records'] or n % self.views:
            raise ValueError(f'{path!r}: the shards hold {n} records, the manifest says {m["records"]} '
                             f'({self.views} views per image); pretokenize into a new directory')
        self.num_images = n // self.views

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        return int(i)

    def read(self, i: int, view: int) -> dict:
        toks, label, v, _ = decode_record(self.records[i * self.views + view], self.length, self.dtype)
        assert v == view, (i, view, v)  # records are written image-major, views in order
        return {'tokens': toks, 'label': np.int32(label), 'skipped': np.int32(0)}


class PickView(grain.transforms.RandomMap):
    """Image index -> the tokens of one of its views, drawn uniformly (the stored augmentation)."""

    def __init__(self, source: TokenSource):
        self.source = source

    def random_map(self, i, rng: np.random.Generator):
        return self.source.read(i, int(rng.integers(0, self.source.views)))


class FirstView(grain.transforms.Map):
    """Evaluation: view 0, the centre crop, unflipped."""

    def __init__(self, source: TokenSource):
        self.source = source

    def map(self, i):
        return self.source.read(i, 0)
