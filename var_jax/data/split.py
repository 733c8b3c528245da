"""A deterministic held-out split of an image folder that has no separate one.

Rule (`data.holdout` = f > 0 and no `data.eval_path`): an image is held out when the first 8 hex
digits of sha1("<class folder>/<path inside it>") read as a fraction of 2^32 are below f. The
decision depends on the file's own name only, never on the order of the listing, the machine or a
seed: adding or removing other images moves no image between the splits, and every run, the
tokenizer, VAR and the judge of var_jax/eval/folder_score.py see the same two parts. A class of
two or more images whose names all hash above f still holds out one (its lowest hash), so every
class is represented in the held-out part; a class of one image stays in training.

`split='train'` keeps the rest, `split='eval'` the held-out images. Class indices and names stay
those of the whole folder.
"""
from __future__ import annotations

import copy
import hashlib
import os

import numpy as np


def _hash(rel: str) -> float:
    return int(hashlib.sha1(rel.encode('utf-8')).hexdigest()[:8], 16) / 2 ** 32


def held_out_mask(root: str, files: list[str], labels: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) bool: which of `files` (paths under `root`, class `labels`) are held out."""
    if not 0 < fraction < 1:
        raise ValueError(f'data.holdout must be in (0, 1) (0 = no held-out split), got {fraction}')
    h = np.asarray([_hash(os.path.relpath(f, root).replace(os.sep, '/')) for f in files])
    mask = h < fraction
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2 and not mask[idx].any():
            mask[idx[np.argmin(h[idx])]] = True
    return mask


def split_folder(source, root: str, fraction: float, split: str):
    """A copy of `source` (a data.pipeline.FolderSource of `root`) with only the `split` part."""
    mask = held_out_mask(root, source.files, source.labels, fraction)
    keep = mask if split == 'eval' else ~mask
    if not keep.any():
        raise ValueError(f'image folder {root!r}: the {split} part of the held-out split is empty '
                         f'({len(source.files)} images, data.holdout={fraction}); add images or set data.eval_path')
    out = copy.copy(source)
    out.files = [f for f, k in zip(source.files, keep) if k]
    out.labels = source.labels[keep]
    return out
