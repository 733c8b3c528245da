"""Fine-tuning a converted official VAR (`--config.init_from=DIR`) on data with other classes.

Everything but the class embedding carries over unchanged: the transformer never sees a class
index, only its embedding row. The official table has num_classes + 1 rows (row num_classes is the
"no class" row that label dropout trains and guidance samples with; models/var.py). For a
different class count the new table is built as

    rows 0 .. K-1 (the new classes)  the mean of the old class rows, or, with
                                     `finetune.class_map` = (old class of new class 0, ...), that
                                     old class's row (e.g. start "my dogs" at ImageNet 207)
    row K (no class)                 the old no-class row, unchanged

The mean row is the embedding an average ImageNet class would have: samples start as generic
images rather than one arbitrary class, and every new row starts alike and separates by its own
class's gradients. The no-class row keeps its meaning (what the model draws unconditioned), so
guidance works from the first step.

`finetune.freeze`: regular expressions over parameter names ('blocks.attn', 'word_embed', ...,
dots between the levels of the state tree); matching parameters get zero updates (optax.masked
set_to_zero after the optimizer, weight decay included), so they stay exactly as loaded.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from var_jax.io import checkpoint
from var_jax.models import VARConfig

# fields that training may set freely: they do not change the weights' shapes or meaning
TRAINING_ONLY = ('dtype', 'remat', 'attention', 'scan_layers', 'cond_drop_rate', 'drop_path_rate', 'init_adaln',
                 'init_adaln_gamma', 'init_head', 'init_std', 'num_classes')


def _effective(cfg: VARConfig) -> VARConfig:
    """width / num_heads 0 mean 64 * depth / depth (models/config.py): compare what they mean."""
    return cfg.replace(width=cfg.C, num_heads=cfg.H)


def resize_class_embedding(table: np.ndarray, num_classes: int, class_map=()) -> np.ndarray:
    """(K_old + 1, C) official class embedding -> (num_classes + 1, C) as the module docstring says."""
    table = np.asarray(table)
    old = table.shape[0] - 1
    if class_map:
        if len(class_map) != num_classes:
            raise ValueError(f'finetune.class_map has {len(class_map)} entries for {num_classes} classes')
        bad = [c for c in class_map if not 0 <= int(c) < old]
        if bad:
            raise ValueError(f'finetune.class_map: {bad} are not classes of the pretrained VAR (0 .. {old - 1})')
        rows = table[np.asarray(class_map, np.int64)]
    else:
        rows = np.repeat(table[:old].mean(0, keepdims=True), num_classes, axis=0)
    return np.concatenate([rows, table[old:]], 0).astype(table.dtype)


def pretrained_var(init_from: str, want: VARConfig, finetune=None) -> nnx.State:
    """The VAR weights in `init_from` for a model of config `want` (its class count may differ)."""
    _, var = checkpoint.load_model(init_from, need_var=True)
    got = _effective(var.config.replace(**{k: getattr(want, k) for k in TRAINING_ONLY}))
    diff = [f'{k} {getattr(got, k)} there, {getattr(want, k)} here' for k in got.to_dict()
            if getattr(got, k) != getattr(_effective(want), k)]
    if diff:
        raise ValueError(f'config.init_from {init_from} holds a different VAR ({"; ".join(diff)}); set config.model '
                         'to match it and use its tokenizer (config.tokenizer.checkpoint)')
    params = nnx.state(var, nnx.Param)
    if var.config.num_classes != want.num_classes:
        emb = params['class_emb']['embedding']
        class_map = tuple((finetune or {}).get('class_map', ()) or ())
        emb.value = jnp.asarray(resize_class_embedding(emb.value, want.num_classes, class_map))
        how = f'rows of ImageNet classes {class_map}' if class_map else 'the mean of the old class rows'
        print(f'[var] class embedding {var.config.num_classes} -> {want.num_classes} classes ({how}; the '
              'no-class row kept)', flush=True)
    return params


def _name(path) -> str:
    return '.'.join(str(k.key) if isinstance(k, jax.tree_util.DictKey) else str(k.idx) for k in path
                    if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))


def frozen_mask(params, patterns) -> object:
    """True where a parameter's dotted name (e.g. 'var.blocks.attn.mat_qkv.kernel') matches a pattern."""
    regs = [re.compile(p) for p in patterns]
    mask = jax.tree_util.tree_map_with_path(lambda p, _: any(r.search(_name(p)) for r in regs), params)
    if regs and not any(jax.tree.leaves(mask)):
        raise ValueError(f'finetune.freeze {tuple(patterns)} matches no parameter (names look like '
                         f'{_name(jax.tree_util.tree_flatten_with_path(params)[0][0][0])})')
    return mask


def with_frozen(tx: optax.GradientTransformation, params, finetune) -> optax.GradientTransformation:
    """`tx` followed by zero updates for the parameters `finetune.freeze` names (none: `tx` itself)."""
    patterns = tuple((finetune or {}).get('freeze', ()) or ())
    if not patterns:
        return tx
    return optax.chain(tx, optax.masked(optax.set_to_zero(), frozen_mask(params, patterns)))
