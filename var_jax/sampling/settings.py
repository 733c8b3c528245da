"""Sampling settings and class labels: the one check of guidance / top-k / top-p, the presets,
the flags every sampling command shares, and the one check of class indices.

top-k and top-p use one convention everywhere (commands, configs, `generate.sample`, the built-in
score): 0 = off. Both checks name their arguments as flags (`--cfg`) for the commands and as
plain names (`cfg`) for library calls; numpy only, so commands check their inputs before JAX starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from importlib import resources

import numpy as np

PRESETS = {
    'official': dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False),
    'paper': dict(cfg=2.0, top_k=900, top_p=0.96, more_smooth=False),
    'demo': dict(cfg=4.0, top_k=900, top_p=0.95, more_smooth=False),
}
EDIT_DEMO = dict(cfg=3.0, top_k=900, top_p=0.95, more_smooth=True)  # demo_zero_shot_edit.ipynb's call
DTYPES = ('float32', 'bfloat16')
_SYNSET = re.compile(r'n\d{8}')


@dataclasses.dataclass(frozen=True)
class Settings:
    cfg: float
    top_k: int
    top_p: float
    more_smooth: bool

    def describe(self) -> str:
        return (f'cfg {self.cfg:g}, top_k {self.top_k}, top_p {self.top_p:g}'
                + (', more_smooth' if self.more_smooth else ''))


def check_settings(cfg: float, top_k: int, top_p: float, more_smooth: bool = False, *, prefix: str = '--') -> Settings:
    """The one check of sampling settings. `prefix` spells the names in messages: '--' for flags,
    '' for arguments of a library call."""
    if not (math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f'{prefix}cfg must be >= 0 (0 = no guidance), got {cfg:g}')
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f'{prefix}top_k must be a non-negative integer (0 = off), got {top_k}')
    if not 0 <= top_p <= 1:  # 0 = off, as in var_jax.sampling.generate and the configs (1 keeps every token too)
        raise ValueError(f'{prefix}top_p must be in [0, 1] (0 = off), got {top_p:g}')
    return Settings(float(cfg), int(top_k), float(top_p), bool(more_smooth))


def resolve_settings(args: argparse.Namespace, preset: str | dict) -> Settings:
    """The preset's values (a name in PRESETS, or the values themselves), each replaced by its flag
    when the flag was given; also checks the --seed that `add_sampling_flags` defines."""
    seed = getattr(args, 'seed', None)
    if seed is not None and seed < 0:
        raise ValueError(f'--seed must be >= 0, got {seed}')
    base = PRESETS[preset] if isinstance(preset, str) else preset
    return check_settings(**{k: v if getattr(args, k) is None else getattr(args, k) for k, v in base.items()})


def add_sampling_flags(p: argparse.ArgumentParser, defaults: str) -> None:
    g = p.add_argument_group('sampling', f'Unset flags take their value from {defaults}.')
    g.add_argument('--cfg', type=float, help='classifier-free guidance scale, >= 0; ramps linearly from 0 at the '
                                             'first scale to this value at the last (official)')
    g.add_argument('--top_k', type=int, help='keep the k most likely tokens, >= 0 (0 = off)')
    g.add_argument('--top_p', type=float, help='nucleus sampling mass, in [0, 1] (0 = off)')
    g.add_argument('--more_smooth', action=argparse.BooleanOptionalAction, default=None,
                   help='official Gumbel-softmax blending of code vectors: smoother pictures; never for FID')
    g.add_argument('--seed', type=int, default=0, help='sampling seed, >= 0 (default 0)')
    g.add_argument('--dtype', choices=DTYPES,
                   help='compute dtype of VAR and VQVAE (default: as saved in model.json, float32 for converted '
                        'checkpoints); the parameters stay float32')


def check_labels(labels, num_classes: int, *, null_ok: bool = False) -> None:
    """The one range check of class indices: 0..num_classes - 1, and with `null_ok` also
    num_classes, the null class that samples unconditionally. `labels`: one index or an array."""
    labels = np.asarray(labels)
    top = num_classes if null_ok else num_classes - 1
    bad = labels[(labels < 0) | (labels > top)]
    if bad.size:
        raise ValueError(f'unknown class {bad.flat[0]}: this model has classes 0..{num_classes - 1}'
                         + (f' (class labels may also be {num_classes}, the null class: unconditional)'
                            if null_ok else ''))


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise ValueError(f'--classes must be comma-separated class indices, got {text!r}') from None
    if not classes:
        raise ValueError('--classes is empty')
    check_labels(classes, num_classes)
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f'class {dup[0]} is given twice in --classes')
    return classes


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> tuple[str, ...]:
    text = resources.files('var_jax.data').joinpath('imagenet_class_names.txt').read_text()
    names = tuple(t for t in text.splitlines() if t and not t.startswith('#'))
    if len(names) != 1000:
        raise ValueError(f'var_jax/data/imagenet_class_names.txt has {len(names)} names, expected 1000')
    return names


def class_names(meta: dict, num_classes: int) -> tuple[str, ...] | None:
    """Human-readable names: a workdir's own (model.json `class_names`), else the ImageNet names for
    1000-class models. WordNet ids (n01440764, ...) alone say little, so ImageNet's replace them."""
    names = tuple(meta.get('class_names') or ())
    if len(names) != num_classes:
        names = ()
    if num_classes == 1000 and (not names or all(_SYNSET.fullmatch(n) for n in names)):
        return imagenet_class_names()
    return names or None


def row_label(c: int, names) -> str:
    return f'{c} {names[c]}' if names else str(c)

