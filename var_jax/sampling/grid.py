"""Samples as one image: a labelled grid (one row per class), or coarse-to-fine strips (one row per
image, the image decoded after each scale). Written in the format the output's suffix names."""
from __future__ import annotations

import sys

import numpy as np

from var_jax.io import outputs
from var_jax.io.checkpoint import Checkpoint
from var_jax.sampling.batch import Sampler, progress_bar
from var_jax.sampling.settings import Settings, class_names, row_label
from var_jax.utils import viz


def write_grid(ck: Checkpoint, settings: Settings, classes, per_class: int, *, out: str, seed: int, devices,
               batch_size: int, progression: bool = False, dtype: str | None = None) -> None:
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    index = np.tile(np.arange(per_class, dtype=np.int64), len(classes))
    names = class_names(ck.meta, ck.num_classes)
    vqvae, var = ck.load(dtype)
    sampler = Sampler(var, vqvae, settings, seed, batch_size, devices, uint8=True, progression=progression)
    images, frames = [], []
    bar = progress_bar(len(labels))
    try:
        for _, im, fr in sampler.run(labels, index, bar):
            images.append(im)
            frames.append(fr)
    finally:
        bar.close()
    if progression:
        strips = np.concatenate(frames)  # (N, K, S, S, 3): one row per image
        rows = [f'{row_label(c, names)} #{i}' for c, i in zip(labels, index)]
        png = viz.grid(strips.reshape((-1,) + strips.shape[2:]), len(labels), strips.shape[1], row_labels=rows)
    else:
        png = viz.grid(np.concatenate(images), len(classes), per_class,
                       row_labels=[row_label(c, names) for c in classes])
    outputs.save_image(out, png)
    print(f'wrote {out} ({settings.describe()}, seed {seed})', file=sys.stderr)
