"""One data setting for both phases of a run that trains its own tokenizer, and what each phase reads.

A VAR run with `tokenizer.train` trains the tokenizer first (train_tokenizer.py), then VAR on its
tokens. Both must see the same images: a tokenizer fitted to other data still runs, but codes
VAR's images badly, and nothing says so until the samples look wrong. Hence (`resolve`):

  * `tokenizer.train` without a `data` entry (configs/folder.py): the tokenizer phase reads
    `config.data`, the settings given once on the command line (`--config.data.path=DIR`);
  * `tokenizer.train.data` given and naming other images than `config.data` (another source,
    folder, dataset, split, held-out rule or image size) is an error, unless
    `tokenizer.allow_other_data` says the difference is wanted (e.g. a tokenizer on a large
    unlabelled folder, VAR on a small labelled one).

`announce` prints what a phase reads before it starts: source, path, images, classes, size.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from var_jax.data.pipeline import make_source

# the data fields that decide which images a phase sees (not how fast or how they are augmented)
SAME_DATA = ('source', 'path', 'eval_path', 'holdout', 'name', 'data_dir', 'train_split', 'image_size')


def resolve(config: ConfigDict) -> ConfigDict:
    """`config` with `tokenizer.train.data` filled from `config.data` when absent (a copy; the
    given config is returned unchanged when nothing is filled); ValueError on the trap above."""
    tok = config.get('tokenizer')
    if tok is None or tok.get('checkpoint') or not tok.get('train'):
        return config
    theirs = tok.train.get('data')
    if theirs is None:
        out = config.copy_and_resolve_references()
        with out.unlocked():
            out.tokenizer.train.data = ConfigDict(config.data.to_dict())
        return out
    diff = [f'{k} {theirs.get(k)!r} vs {config.data.get(k)!r}' for k in SAME_DATA
            if _norm(theirs.get(k)) != _norm(config.data.get(k))]
    if diff and not tok.get('allow_other_data', False):
        raise ValueError('the tokenizer would train on other images than VAR: config.tokenizer.train.data differs '
                         f'from config.data ({"; ".join(diff)}); give the data once (configs/folder.py reads '
                         'config.data in both phases), set the same --config.tokenizer.train.data.* values, or '
                         '--config.tokenizer.allow_other_data=True if the difference is wanted')
    return config


def _norm(v):
    return v or None  # '' / 0 / None all mean "unset"


def announce(phase: str, data_cfg) -> None:
    """Print `[phase] reads: source, path, images (held-out), classes, image size`."""
    src = make_source(data_cfg, 'train')
    where = f' {data_cfg.path}' if data_cfg.get('path') else f' {data_cfg.get("name")}' \
        if data_cfg.source == 'tfds' else ''
    held = ''
    if data_cfg.source == 'imagefolder':
        if data_cfg.get('eval_path'):
            held = f', held-out images in {data_cfg.eval_path}'
        elif data_cfg.get('holdout'):
            held = f', {len(make_source(data_cfg, "eval"))} held out (data.holdout={data_cfg.holdout:g})'
        else:
            held = ', no held-out split'
    names = list(getattr(src, 'class_names', ()) or ())
    shown = ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')
    print(f'[{phase}] reads {data_cfg.source}{where}: {len(src)} training images{held}; '
          f'{src.num_classes} classes ({shown}); {data_cfg.image_size} px', flush=True)
