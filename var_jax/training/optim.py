"""AdamW with the official VAR schedules and no-decay list (`utils/lr_control.py`).

Learning rate (per iteration `it` of `max_it`):
    warm-up  it < wp_it:  peak * (wp0 + (1 - wp0) * it / wp_it)
    'lin0':  pasd = (it - wp_it) / (max_it - 1 - wp_it);  peak while pasd < 0.05, then linear
             down to wpe * peak at the end
    'cos':   half-cosine from peak to wpe * peak after warm-up
    'const': peak after warm-up
Weight decay: cosine from `wd` (it 0) to `wd_end` (last it). Decoupled (AdamW, as torch).
Parameters without decay (official `filter_params`): 1-D tensors (per layer for the stacked
blocks), names ending in `bias` (every bias inside the blocks too), and names containing pos_*,
lvl_embed, scale_mul, ada_gss, gamma, beta, cls/start tokens (the official no-decay list).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

NO_DECAY = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
            'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')


def lr_schedule(peak: float, max_it: int, wp_it: int, *, wp0: float = 0.005, wpe: float = 0.01,
                kind: str = 'lin0'):
    """Official `lr_wd_annealing` learning rate as an optax schedule (jit-friendly)."""
    if kind not in ('lin0', 'cos', 'const'):
        raise ValueError(f"lr schedule must be 'lin0', 'cos' or 'const', got {kind!r}")
    wp_it = round(wp_it)

    def fn(it):
        it = jnp.asarray(it, jnp.float32)
        warm = wp0 + (1 - wp0) * it / max(wp_it, 1)
        pasd = (it - wp_it) / max(max_it - 1 - wp_it, 1)
        if kind == 'lin0':
            t = 0.05
            after = jnp.where(pasd < t, 1.0, wpe + (1 - wpe) * (1 - pasd) / (1 - t))
        elif kind == 'cos':
            after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))
        else:
            after = jnp.ones_like(pasd)
        return peak * jnp.where(it < wp_it, warm, after)

    return fn


def wd_schedule(wd: float, wd_end: float, max_it: int):
    def fn(it):
        pasd = jnp.asarray(it, jnp.float32) / max(max_it - 1, 1)
        return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))

    return fn


def decay_mask(params) -> Any:
    """True where weight decay applies: the official `filter_params` groups.

    Official rule, per torch parameter: no decay when `ndim == 1`, the name ends in `bias`, or the
    name contains a NO_DECAY key. Here the name is read from the parameter's path as the trainer
    passes it ({'var': nnx.State}: `var.blocks.attn.q_bias.value`): dict keys form the name, while
    attribute steps (the `.value` of an nnx.Param) are not part of it. Block parameters are stacked
    with a leading depth axis, so a (depth, C) bias is 1-D per layer; our q_bias / v_bias keep a
    per-head (H, C/H) shape but are `bias` by name, as officially.
    """

    def name_of(path) -> list[str]:
        out = []
        for k in path:
            if isinstance(k, jax.tree_util.DictKey):
                out.append(str(k.key))
            elif isinstance(k, jax.tree_util.SequenceKey):
                out.append(str(k.idx))
        return out

    def decays(path, x):
        names = name_of(path)
        name = '.'.join(names)
        ndim = np.ndim(x) - (1 if 'blocks' in names else 0)
        is_bias = bool(names) and names[-1].endswith('bias')
        return not (ndim <= 1 or is_bias or any(k in name for k in NO_DECAY))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, peak_lr: float, max_it: int, wp_it: int, wd: float = 0.05, wd_end: float | None = None,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, clip: float = 2.0, wp0: float = 0.005,
                   wpe: float = 0.01, sched: str = 'lin0', mask=None) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with per-step lr and wd schedules.

    `mask`: decay mask pytree (or a function of params); None decays everything.
    """
    lr = lr_schedule(peak_lr, max_it, wp_it, wp0=wp0, wpe=wpe, kind=sched)
    wdf = wd_schedule(wd, wd if wd_end is None else wd_end, max_it)
    # `mask` static: inject_hyperparams would otherwise call a mask function as a schedule of the
    # step count (and decay nothing); a mask pytree gives the same optimizer state either way
    adamw = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
        learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wdf, mask=mask)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def current_hparams(opt_state) -> dict[str, jax.Array]:
    """lr / wd used by the last update (from inject_hyperparams' state)."""
    is_hp = lambda x: hasattr(x, 'hyperparams') and isinstance(x.hyperparams, dict)  # noqa: E731
    for s in jax.tree.leaves(opt_state, is_leaf=is_hp):
        if is_hp(s):
            return {'lr': s.hyperparams['learning_rate'], 'wd': s.hyperparams['weight_decay']}
    return {}
