"""AdamW with the official VAR schedules and no-decay list (`utils/lr_control.py`).

Learning rate (per iteration `it` of `max_it`):
    warm-up  it < wp_it:  peak * (wp0 + (1 - wp0) * it / wp_it)
    'lin0':  pasd = (it - wp_it) / (max_it - 1 - wp_it);  peak while pasd < 0.05, then linear
             down to wpe * peak at the end
    'cos':   half-cosine from peak to wpe * peak after warm-up
    'const': peak after warm-up
Weight decay: cosine from `wd` (it 0) to `wd_end` (last it). Decoupled (AdamW, as torch).
Parameters without decay: 1-D tensors, biases, and names containing pos_*, lvl_embed, scale_mul,
ada_gss, gamma, beta, cls/start tokens (official list).
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

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


def decay_mask(params: nnx.State) -> Any:
    """True where weight decay applies (official `filter_params`)."""

    def decays(path, x):
        name = '.'.join(str(p) for p in path)
        is_bias = str(path[-1]) in ('bias', 'q_bias', 'v_bias') or re.search(r'bias$', name)
        layer_axis = 1 if path and path[0] == 'blocks' else 0  # stacked blocks: ignore the depth axis
        return not (x.ndim - layer_axis <= 1 or is_bias or any(k in name for k in NO_DECAY))

    return jax.tree_util.tree_map_with_path(lambda p, x: decays(tuple(getattr(k, 'key', k) for k in p), x), params)


def make_optimizer(*, peak_lr: float, max_it: int, wp_it: int, wd: float = 0.05, wd_end: float | None = None,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, clip: float = 2.0, wp0: float = 0.005,
                   wpe: float = 0.01, sched: str = 'lin0', mask=None) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with per-step lr and wd schedules.

    `mask`: decay mask pytree (or a function of params); None decays everything.
    """
    lr = lr_schedule(peak_lr, max_it, wp_it, wp0=wp0, wpe=wpe, kind=sched)
    wdf = wd_schedule(wd, wd if wd_end is None else wd_end, max_it)
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wdf,
                                                  mask=mask)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def current_hparams(opt_state) -> dict[str, jax.Array]:
    """lr / wd used by the last update (from inject_hyperparams' state)."""
    is_hp = lambda x: hasattr(x, 'hyperparams') and isinstance(x.hyperparams, dict)  # noqa: E731
    for s in jax.tree.leaves(opt_state, is_leaf=is_hp):
        if is_hp(s):
            return {'lr': s.hyperparams['learning_rate'], 'wd': s.hyperparams['weight_decay']}
    return {}
