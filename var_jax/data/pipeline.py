"""grain input pipelines shared by both trainers: sources, official augmentation, host sharding.

    source (built-in shapes10 | image folder | TFDS array_record; pre-tokenized: data/tokens.py)
      -> [train] seed + global shuffle + repeat      (same permutation on every process)
      -> this process's slice  ds[process_index::process_count]
      -> decode (corrupt or unreadable images are replaced by the next readable one and counted;
                 huge images decoded at a bounded size, 16-bit ones scaled to 8 bit)
      -> official augmentation: shorter side to round(1.125 * res) (Lanczos), random crop, [flip]
      -> batch(per-process batch) -> iterator (optionally multiprocess), checkpointable via grain

Batches are numpy dicts: `image` uint8 (B, res, res, 3), `label` int32 (B,), `skipped` int32 (B,).
Scaling to [-1, 1] happens on the device (uint8 moves 4x less data host -> device).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any

import grain
import numpy as np
from PIL import Image

from var_jax.data import builtin, images, tokens
from var_jax.data.split import split_folder

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')
MAX_SKIP = 16  # how far a corrupt image looks for a readable replacement


# ---------------------------------------------------------------------------- sources
class BuiltinSource:
    """shapes10 in memory: (uint8 image, label)."""

    def __init__(self, split: str, image_size: int):
        self.images, self.labels = builtin.load(split, image_size)
        self.num_classes, self.class_names = builtin.NUM_CLASSES, builtin.CLASS_NAMES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {'image': self.images[i], 'label': self.labels[i]}


class FolderSource:
    """Images in one subfolder per class (the official / torchvision ImageFolder layout), or all at
    the top level of a flat folder (one class named after the folder: unlabelled data, e.g. the
    ImageNet validation images for tokenizer metrics). Files are read lazily."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f'image folder {root!r} does not exist')
        entries = list(os.scandir(root))
        class_dirs = sorted(e.name for e in entries if e.is_dir())
        loose = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
        if class_dirs and loose:  # ignoring either part would silently drop data
            raise ValueError(f'image folder {root!r} has both class subfolders and {len(loose)} images at its top '
                             'level (e.g. ' + loose[0] + '); use one layout: root/<class>/<image> or root/<image>')
        if not class_dirs and not loose:
            raise ValueError(f'image folder {root!r} has no class subfolders and no images '
                             f'(expected root/<class>/<image> or root/<image>; {", ".join(IMAGE_EXTS)})')
        self.files: list[str] = []
        labels = []
        if class_dirs:
            self.class_names = tuple(class_dirs)
            for ci, name in enumerate(self.class_names):
                for dirpath, _, files in os.walk(os.path.join(root, name)):
                    for f in sorted(files):
                        if f.lower().endswith(IMAGE_EXTS):
                            self.files.append(os.path.join(dirpath, f))
                            labels.append(ci)
        else:
            self.class_names = (os.path.basename(os.path.normpath(root)),)
            self.files = [os.path.join(root, f) for f in loose]
            labels = [0] * len(loose)
        if not self.files:
            raise ValueError(f'image folder {root!r} contains no images ({", ".join(IMAGE_EXTS)})')
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], 'rb') as fh:
            return {'image': fh.read(), 'label': self.labels[i]}


class TFDSSource:
    """A prepared TFDS dataset read with `tfds.data_source` (array_record; no TensorFlow needed).

    Images come back as encoded bytes (SkipDecoding) and are decoded with PIL like every other
    source, so a corrupt record is skipped the same way. Never downloads.
    """

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy import, only for this source)

        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                       decoders={'image': tfds.decode.SkipDecoding()})
            info = tfds.builder(name, data_dir=data_dir or None).info
        except Exception as e:  # noqa: BLE001  (tfds raises many types for "not prepared")
            raise ValueError(f'TFDS dataset {name!r} split {split!r} is not available under '
                             f'{data_dir or "~/tensorflow_datasets"} ({type(e).__name__}); prepare it first '
                             '(see README, "ImageNet")') from None
        label = info.features['label']
        self.num_classes = label.num_classes
        self.class_names = tuple(label.names)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        r = self.ds[i]
        return {'image': r['image'], 'label': np.int32(r['label'])}


def make_source(data_cfg, split: str):
    kind = data_cfg.source
    if kind == 'builtin':
        return BuiltinSource('train' if split == 'train' else 'test', data_cfg.image_size)
    if kind == 'imagefolder':
        if data_cfg.get('holdout', 0) and not data_cfg.get('eval_path'):  # var_jax/data/split.py
            return split_folder(FolderSource(data_cfg.path), data_cfg.path, data_cfg.holdout, split)
        root = data_cfg.path if split == 'train' else (data_cfg.get('eval_path') or data_cfg.path)
        return FolderSource(root)
    if kind == 'tfds':
        return TFDSSource(data_cfg.name, data_cfg.train_split if split == 'train' else data_cfg.eval_split,
                          data_cfg.get('data_dir'))
    if kind == 'tokens':
        if split != 'train':
            raise ValueError('data.source tokens holds the training split only (python -m var_jax.pretokenize)')
        return tokens.TokenSource(data_cfg.path)
    raise ValueError(f"data.source must be 'builtin', 'imagefolder', 'tfds' or 'tokens', got {kind!r}")


# ---------------------------------------------------------------------------- transforms
def decode(image: Any, min_side: int | None = None) -> Image.Image:
    """bytes / uint8 array -> RGB PIL image (raises on corrupt data).

    `min_side`: the shorter side the transform will resize to. A much larger image is decoded at a
    bounded size: JPEGs through `draft` (the decoder's DCT scaling by 1/2, 1/4 or 1/8), other
    formats reduced by an integer box filter right after load, in both cases only when the shorter
    side keeps at least 2 * min_side (it ends in [2, 4) x min_side), so the Lanczos resize that
    follows sees no big image and the pipeline holds no full-size copy. Images under 4 * min_side
    decode exactly as before; reduced ones differ slightly (about a grey level) from resizing the
    full image. An image over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is refused
    (ValueError: skipped like an unreadable file). 16-bit images are scaled to 8 bit, not clipped.
    """
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    with warnings.catch_warnings():  # over the limit we raise below (PIL only warns up to 2x)
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(image))
    w, h = im.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ValueError(f'{w}x{h} image is over the decompression-bomb limit of {limit} pixels')
    if min_side and im.format == 'JPEG' and min(w, h) >= 4 * min_side:
        im.draft('RGB', (2 * min_side, 2 * min_side))
    im.load()
    factor = min(im.size) // (2 * min_side) if min_side else 1
    if factor >= 2:
        im = images.to_8bit(im)
        if im.mode not in ('L', 'LA', 'RGB', 'RGBA'):  # palette / CMYK / bilevel: average colours, not indices
            im = im.convert('RGB')
        im = im.reduce(factor)
    return images.to_rgb8(im)


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = size / min(w, h)
    return im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)


class SafeSource:
    """Wraps a source: element i is the first *readable* image at i, i+1, ... (counted as skipped).

    `min_side`: passed to `decode` (huge images are decoded at a bounded size)."""

    def __init__(self, source, min_side: int | None = None):
        self.source, self.min_side = source, min_side

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        for k in range(MAX_SKIP):
            rec = self.source[(i + k) % len(self.source)]
            try:
                return {'image': decode(rec['image'], self.min_side), 'label': np.int32(rec['label']),
                        'skipped': np.int32(k)}
            except Exception:  # noqa: BLE001  (any decoder failure means "unreadable")
                continue
        raise ValueError(f'{MAX_SKIP} consecutive unreadable images from index {i}; is the dataset corrupt?')


class Augment(grain.transforms.RandomMap):
    """Official train transform: Lanczos resize of the shorter side to round(1.125 * res), random
    crop, optional horizontal flip. With `crop_ratio` 1 (the built-in data) it only crops/flips."""

    def __init__(self, res: int, hflip: bool, crop_ratio: float = 1.125):
        self.res, self.hflip, self.mid = res, hflip, round(crop_ratio * res)

    def random_map(self, el, rng: np.random.Generator):
        im = el['image']
        if min(im.size) != self.mid:
            im = resize_shorter(im, self.mid)
        w, h = im.size
        x, y = rng.integers(0, w - self.res + 1), rng.integers(0, h - self.res + 1)
        arr = np.asarray(im.crop((x, y, x + self.res, y + self.res)), np.uint8)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return {'image': np.ascontiguousarray(arr), 'label': el['label'], 'skipped': el['skipped']}


class CenterCrop(grain.transforms.Map):
    """Official eval transform: same resize, centre crop."""

    def __init__(self, res: int, crop_ratio: float = 1.125):
        self.res, self.mid = res, round(crop_ratio * res)

    def map(self, el):
        im = el['image']
        if min(im.size) != self.mid:
            im = resize_shorter(im, self.mid)
        w, h = im.size
        x, y = (w - self.res) // 2, (h - self.res) // 2
        arr = np.asarray(im.crop((x, y, x + self.res, y + self.res)), np.uint8)
        return {'image': arr, 'label': el['label'], 'skipped': el['skipped']}


# ---------------------------------------------------------------------------- pipelines
def read_options(data_cfg, local_batch: int) -> grain.ReadOptions:
    """Prefetch of whole batches, bounded in bytes: at most `data.buffer_mb` MiB of decoded batches
    ahead (at least one, at most 16, grain's default thread count), with as many threads (a thread
    makes one batch). grain's default (500 batches) grows to many GiB while the accelerator is the
    bottleneck (500 x 768 x 256^2 x 3 bytes = 75 GB)."""
    batch_bytes = local_batch * data_cfg.image_size ** 2 * 3
    n = int(max(1, min(16, data_cfg.get('buffer_mb', 1024) * 2 ** 20 // batch_bytes)))
    return grain.ReadOptions(num_threads=n, prefetch_buffer_size=n)


def make_dataset(data_cfg, *, split: str, local_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, train: bool = True):
    """-> (grain IterDataset of batches, source). `train`: infinite, shuffled, augmented.

    Memory (docs/gpu.md, "Input pipeline memory"): each process, and each of `data.workers` worker
    processes, buffers at most `read_options` batches plus 2 in the worker's output queue, and
    decodes one image per thread at a bounded size (`decode`).
    """
    if data_cfg.source == 'tokens':
        return make_token_dataset(data_cfg, split=split, local_batch=local_batch, seed=seed,
                                  process_index=process_index, process_count=process_count, train=train)
    source = make_source(data_cfg, split)
    ratio = 1.0 if data_cfg.source == 'builtin' else 1.125
    ds = grain.MapDataset.source(SafeSource(source, min_side=round(ratio * data_cfg.image_size)))
    if train:
        ds = ds.seed(seed).shuffle().repeat()
    ds = ds[process_index::process_count]
    if train:
        ds = ds.random_map(Augment(data_cfg.image_size, bool(data_cfg.get('hflip', False)), ratio))
    else:
        ds = ds.map(CenterCrop(data_cfg.image_size, ratio))
    ds = ds.batch(local_batch, drop_remainder=train)
    return _iterate(ds, data_cfg, local_batch), source


def make_token_dataset(data_cfg, *, split: str, local_batch: int, seed: int, process_index: int = 0,
                       process_count: int = 1, train: bool = True):
    """Pre-tokenized images (var_jax/data/tokens.py): batches of `tokens` (B, L) int16/int32 (the
    per-scale indices of one stored view per image, drawn anew every epoch), `label`, `skipped` (0).
    Same seed, shuffle and host slicing as the image pipelines."""
    source = make_source(data_cfg, split)
    ds = grain.MapDataset.source(source)
    if train:
        ds = ds.seed(seed).shuffle().repeat()
    ds = ds[process_index::process_count]
    ds = ds.random_map(tokens.PickView(source)) if train else ds.map(tokens.FirstView(source))
    ds = ds.batch(local_batch, drop_remainder=train)
    return _iterate(ds, data_cfg, local_batch), source


def _iterate(ds, data_cfg, local_batch: int):
    it = ds.to_iter_dataset(read_options(data_cfg, local_batch))
    workers = int(data_cfg.get('workers', 0))
    if workers > 0:
        from absl import flags  # noqa: PLC0415
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags (library use, tests)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return it
