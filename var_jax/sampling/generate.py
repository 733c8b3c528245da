"""Next-scale sampling with a KV cache and classifier-free guidance (official
`autoregressive_infer_cfg`).

For each scale k = 0..K-1 (unrolled: K static shapes, one compiled program):
    logits = VAR(tokens of scale k | cache)              batch doubled: [conditional; null class]
    logits = (1 + t) * cond - t * uncond,  t = cfg * k / (K - 1)     (no guidance at k = 0)
    r_k    ~ softmax(top_k / top_p filtered logits)       (per-row PRNG key folded with k)
    f_hat  += Phi_k(bicubic(E[r_k]));  next input = area(f_hat -> pn_{k+1})
image = decode(f_hat), returned in [0, 1].

Randomness is per row: row i uses `fold_in(key, i)` (or its own key when `keys` has one per row),
so an image depends on its key and label only, not on the batch it is sampled in.
The same loop serves zero-shot editing (`teacher=`): tokens outside the mask are forced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models import VAR, VQVAE, check_pair
from var_jax.sampling.settings import check_labels, check_settings

F32 = jnp.float32


# ---------------------------------------------------------------------------- token filtering
# XLA's CPU sort is slow (a comparator loop): sorting the 680 x 4096 logits of one d16 image took
# several seconds, a large part of the whole sampler (docs/benchmarks.md). top-k only needs the
# largest k, which lax.top_k finds much faster, but k is traced (changing it must not recompile)
# while lax.top_k needs a static count: it takes the TOP_K_CAPACITY largest, and the exact full
# sort runs instead (lax.cond, one branch executed) when top_k is off or above the capacity, or ties
# at the k-th value keep more than that. Both branches give the same arrays, bit for bit.
TOP_K_CAPACITY = 1024  # covers the official top_k = 900


def _sorted_full(logits):
    """(stable ascending sort of the logits, the permutation)."""
    order = jnp.broadcast_to(jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape)
    return jax.lax.sort_key_val(logits, order, dimension=-1)


def _sorted_top(logits, vals, ridx):
    """The top positions of `_sorted_full` from `lax.top_k(logits[..., ::-1], cap)` = (vals, ridx),
    -inf below them (where the order is any permutation of the remaining tokens). top_k breaks
    ties by the lower index first; on the reversed vector that is the higher original index first,
    which read backwards is the stable ascending order."""
    v, cap = logits.shape[-1], vals.shape[-1]
    top_order = (v - 1 - ridx)[..., ::-1].astype(jnp.int32)
    rows = top_order.reshape(-1, cap)
    in_top = jax.vmap(lambda o: jnp.zeros(v, bool).at[o].set(True))(rows)
    rest = jax.vmap(lambda m: jnp.nonzero(~m, size=v - cap)[0].astype(jnp.int32))(in_top)
    order = jnp.concatenate([rest, rows], -1).reshape(logits.shape)
    srt = jnp.concatenate([jnp.full(logits.shape[:-1] + (v - cap,), -jnp.inf, F32), vals[..., ::-1]], -1)
    return srt, order


def filter_logits(logits: jax.Array, top_k, top_p) -> tuple[jax.Array, jax.Array]:
    """Official `sample_with_top_k_top_p_` as a mask, for logits (..., V).

    top-k removes logits strictly below the k-th largest (ties kept); top-p then sorts ascending
    and removes where the cumulative probability is <= 1 - top_p, always keeping the maximum.
    `top_k <= 0` / `top_p <= 0` switch a filter off. Both may be traced.
    Returns (logits sorted ascending with removed entries at -inf, the sort permutation).
    Only the order of removed entries may differ from a full sort's (see TOP_K_CAPACITY).
    """
    v = logits.shape[-1]
    logits = logits.astype(F32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    cap = min(TOP_K_CAPACITY, v)

    def sort_top():
        vals, ridx = jax.lax.top_k(logits[..., ::-1], cap)  # descending values
        kth = jnp.take_along_axis(vals, jnp.broadcast_to(k - 1, vals.shape[:-1] + (1,)), -1)
        fits = jnp.all(jnp.sum(logits >= kth, -1) <= cap)  # the k-th largest's whole tie group is in the top
        return jax.lax.cond(fits, lambda: _sorted_top(logits, vals, ridx), lambda: _sorted_full(logits))

    if 0 < cap < v:  # (TOP_K_CAPACITY = 0: always the full sort, as before it existed)
        srt, order = jax.lax.cond(k <= cap, sort_top, lambda: _sorted_full(logits))
    else:
        srt, order = _sorted_full(logits)
    kth_largest = jnp.take_along_axis(srt, jnp.broadcast_to(v - k, srt.shape[:-1] + (1,)).astype(jnp.int32), -1)
    srt = jnp.where(srt < kth_largest, -jnp.inf, srt)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    remove = (cum <= 1 - top_p) & (top_p > 0)
    remove = remove.at[..., -1].set(False)
    return jnp.where(remove, -jnp.inf, srt), order


def sample_tokens(key, logits, top_k, top_p, more_smooth: bool = False, ratio: float = 0.0,
                  codebook: jax.Array | None = None):
    """Draw one token per position from logits (l, V) of one row.

    Returns (tokens (l,) int32, code vectors (l, C) or None). With `more_smooth` the code
    vectors are the official Gumbel-softmax blend over the filtered logits (visual smoothing only).
    """
    srt, order = filter_logits(logits, top_k, top_p)
    return draw_tokens(key, srt, order, more_smooth, ratio, codebook)


def draw_tokens(key, srt, order, more_smooth: bool = False, ratio: float = 0.0, codebook=None):
    """`sample_tokens` after the filtering: one row's (srt, order) from `filter_logits`.

    The sampler filters all rows in one call (outside its vmap over rows, where lax.cond would
    become a select running both branches) and draws per row here."""
    k_tok, k_gumbel = jax.random.split(key)
    pick = jax.random.categorical(k_tok, srt, axis=-1)
    tokens = jnp.take_along_axis(order, pick[..., None], -1)[..., 0]
    if not more_smooth:
        return tokens, None
    filtered = jnp.full_like(srt, -jnp.inf).at[jnp.arange(srt.shape[0])[:, None], order].set(srt)
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    g = jax.random.gumbel(k_gumbel, filtered.shape, F32)
    soft = jax.nn.softmax((filtered * (1 + ratio) + g) / tau, axis=-1)
    return tokens, soft @ codebook


# ---------------------------------------------------------------------------- the loop
TRACE_COUNT = {'generate': 0}  # incremented when the sampler is traced (tests check no recompiles)


def _generate(var: VAR, vqvae: VQVAE, labels, keys, cfg, top_k, top_p, more_smooth: bool,
              teacher=None, return_logits: bool = False, guided: bool = True):
    """Traceable next-scale loop. labels (B,), keys (B,) PRNG keys -> (idx_list, f_hat, logits).

    `guided=False` (static; only for cfg == 0, where the null-class half has weight 0) skips the
    null-class rows: half the work, the same tokens.
    """
    TRACE_COUNT['generate'] += 1
    vc, pns = var.config, var.config.patch_nums
    b, sn = labels.shape[0], len(pns)
    rows = jnp.concatenate([labels, jnp.full_like(labels, vc.num_classes)]) if guided else labels
    cond, block_cond = var.condition(rows)
    cache = var.init_cache(rows.shape[0])
    x = var.first_input(cond)
    f_hat = jnp.zeros((b, vqvae.config.latent_size, vqvae.config.latent_size, vqvae.config.z_channels), F32)
    codebook = vqvae.quantize.codebook()
    idx_list, used_logits = [], []
    for si, pn in enumerate(pns):
        ratio = si / max(sn - 1, 1)
        logits, cache = var.step(si, x, cond, block_cond, cache)
        if guided:
            t = cfg * ratio
            logits = (1 + t) * logits[:b] - t * logits[b:]
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, si))(keys)
        srt, order = filter_logits(logits, top_k, top_p)  # all rows at once: see draw_tokens
        idx, soft = jax.vmap(lambda k, s, o: draw_tokens(k, s, o, more_smooth, ratio, codebook))(
            step_keys, srt, order)
        if teacher is not None:  # editing: keep the given tokens where the mask is 0
            forced, free = teacher[0][si], teacher[1][si]
            idx = jnp.where(free, idx, forced)
            if soft is not None:
                soft = jnp.where(free[..., None], soft, jnp.take(codebook, forced, axis=0))
        h = jnp.take(codebook, idx, axis=0) if soft is None else soft
        f_hat, nxt = vqvae.quantize.next_input(si, f_hat, h.reshape(b, pn, pn, -1))
        if nxt is not None:
            x = var.scale_input(si + 1, nxt)
            x = jnp.concatenate([x, x]) if guided else x
        idx_list.append(idx.astype(jnp.int32))
        if return_logits:
            used_logits.append(logits)
    return idx_list, f_hat, (jnp.concatenate(used_logits, 1) if return_logits else None)


@nnx.jit(static_argnames=('more_smooth', 'return_logits', 'decode', 'guided'))
def _sample_jit(var, vqvae, labels, keys, cfg, top_k, top_p, teacher=None, *, more_smooth=False,
                return_logits=False, decode=True, guided=True):
    idx_list, f_hat, logits = _generate(var, vqvae, labels, keys, cfg, top_k, top_p, more_smooth, teacher,
                                        return_logits, guided)
    images = (vqvae.decode(f_hat) + 1) / 2 if decode else None
    return images, idx_list, f_hat, logits


def image_keys(seed: int, labels, index) -> jax.Array:
    """One key per image from (seed, class, index within the class): an image depends only on
    these three numbers, never on the batch size, the device count or the other images."""
    base = jax.random.key(seed)
    return jax.vmap(lambda c, i: jax.random.fold_in(jax.random.fold_in(base, c), i))(
        jnp.asarray(labels, jnp.uint32), jnp.asarray(index, jnp.uint32))


def row_keys(key, batch: int) -> jax.Array:
    """One key per row: `fold_in(key, i)` for a single key, or the given (B,) keys."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        single = key.ndim == 0
    else:  # raw uint32 keys: (2,) single or (B, 2)
        single = key.ndim == 1
    if single:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    if key.shape[0] != batch:
        raise ValueError(f'got {key.shape[0]} keys for {batch} labels')
    return key


def _guided(cfg) -> bool:
    """False only for a concrete cfg of 0; a traced cfg keeps the null-class rows."""
    return isinstance(cfg, jax.core.Tracer) or float(cfg) != 0.0


def check_sampling_args(var: VAR, labels, cfg, top_k, top_p):
    if not isinstance(labels, jax.Array):
        labels = np.asarray(labels)  # host labels: checked without a device round trip
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape[0] < 1:
        raise ValueError(f'labels must be a non-empty integer vector (B,), got {labels.dtype} {labels.shape}')
    if not isinstance(labels, jax.core.Tracer):
        check_labels(labels, var.config.num_classes, null_ok=True)
    check_settings(cfg, top_k, top_p, prefix='')
    return jnp.asarray(labels, jnp.int32)


def sample(var: VAR, vqvae: VQVAE, labels, key, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
           more_smooth: bool = False, *, return_logits: bool = False, teacher=None):
    """Class-conditional samples: -> (images NHWC float32 in [0, 1], idx_list [(B, pn*pn) int32]).

    `key` is one PRNG key (row i uses fold_in(key, i)) or one key per label. `cfg`, `top_k` and
    `top_p` are traced: changing them does not recompile; a new batch size does, and so does
    switching between cfg == 0 (sampled without the null-class rows) and cfg > 0.
    With `return_logits` a third value holds the guided logits the sampler drew from (B, L, V).
    """
    check_pair(vqvae.config, var.config)
    labels = check_sampling_args(var, labels, cfg, top_k, top_p)
    keys = row_keys(key, labels.shape[0])
    images, idx_list, _, logits = _sample_jit(
        var, vqvae, labels, keys, jnp.asarray(cfg, F32), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, F32),
        teacher, more_smooth=bool(more_smooth), return_logits=return_logits, guided=_guided(cfg))
    return (images, idx_list, logits) if return_logits else (images, idx_list)


def generate_fhat(var: VAR, vqvae: VQVAE, labels, key, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False):
    """The transformer part of `sample` alone: -> (idx_list, f_hat); decode with `vqvae.decode`."""
    labels = check_sampling_args(var, labels, cfg, top_k, top_p)
    _, idx_list, f_hat, _ = _sample_jit(
        var, vqvae, labels, row_keys(key, labels.shape[0]), jnp.asarray(cfg, F32), jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, F32), more_smooth=bool(more_smooth), decode=False, guided=_guided(cfg))
    return idx_list, f_hat
