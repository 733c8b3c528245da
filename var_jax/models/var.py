"""VAR: the scale-blockwise autoregressive transformer (official `VAR`, `basic_var.py`).

Sequence: [class token (+pos_start)] + teacher-forcing input of scales 1..K-1, L tokens in all,
each position given `lvl_embed[scale] + pos_1LC[position]`. Attention is full inside a scale and
causal across scales (`attend`: 'blockwise' computes only the unmasked part). Each block is
AdaLN-modulated self-attention and MLP:

    g1, g2, s1, s2, b1, b2 = ada_lin(silu(c))            (shared AdaLN: ada_gss + shared(c))
    x = x + drop_path(attn(LN(x) * (1 + s1) + b1) * g1)
    x = x + drop_path(ffn (LN(x) * (1 + s2) + b2) * g2)
    logits = head(LN(x) * (1 + scale) + shift),  scale, shift = head_nm.ada_lin(silu(c))

Attention normalises q and k (L2) and scales q by a learnt per-head exp(min(s, log 100)).
The `depth` blocks are stacked on a leading axis and run with `nnx.scan` (one compiled block).

Precision: parameters float32; matmuls in `config.dtype`; the residual stream, LayerNorm
statistics, softmax and logits in float32 (the head accumulates and returns float32). Logical
sharding axes live in each parameter's `axes` metadata; `var_jax.parallel.sharding` maps them to a mesh.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models.config import ATTENTION, VARConfig, to_jnp_dtype
from var_jax.parallel.sharding import constrain

F32 = jnp.float32
LOG_100 = math.log(100.0)
STACK = {nnx.PARTITION_NAME: None, 'axes': 'layers'}  # how nnx.vmap / nnx.scan tag the depth axis


def trunc_normal(std: float, scale=1.0):
    """torch `trunc_normal_(std=std)`, times `scale` (an array scales the output columns).

    torch's bounds are absolute +-2, i.e. +-2/std sigmas (about 110 sigma for d16), so the
    official init is a plain normal in practice; clipping at +-2 keeps the bound without
    `jax.random.truncated_normal`, whose XLA compile costs ~0.15 s per shape on CPU.
    """

    def init(key, shape, dtype=F32):
        x = jnp.clip(std * jax.random.normal(key, shape, F32), -2.0, 2.0)
        return (x * jnp.asarray(scale, F32)).astype(dtype)

    return init


def _axes(*names):
    return {'axes': names}


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, two-pass float32 statistics (as torch).

    The backward is written out (`_norm_bwd`) because XLA CPU fuses the autodiff one badly:
    it recomputes the residual-stream gradient of later blocks inside each norm's backward
    (`python -m var_jax.bench train` measures both; docs/benchmarks.md).
    """
    return _norm(x.astype(F32), eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _norm(x, eps):
    return _norm_fwd(x, eps)[0]


def _norm_fwd(x, eps):
    mean = jnp.mean(x, -1, keepdims=True)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + eps)
    x_hat = (x - mean) * r
    return x_hat, (x_hat, r)


def _norm_bwd(eps, res, g):
    del eps
    x_hat, r = res
    return (r * (g - jnp.mean(g, -1, keepdims=True) - x_hat * jnp.mean(g * x_hat, -1, keepdims=True)),)


_norm.defvjp(_norm_fwd, _norm_bwd)


def layer_norm_autodiff(x: jax.Array, eps: float) -> jax.Array:
    """The same LayerNorm differentiated by JAX (the baseline of `bench train`)."""
    x = x.astype(F32)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def dense(x: jax.Array, w: jax.Array, dimension_numbers=None, precision=None, preferred_element_type=None,
          out_sharding=None) -> jax.Array:
    """x (..., K) @ w (K, N), the `dot_general` of the block Linears and the head.

    Same forward and gradients as autodiff; on CPU the weight gradient dW = X^T dY is formed
    differently. Autodiff's dot contracts the token axis of X in place (X "transposed" inside the
    dot), which XLA:CPU does not give to its fast YNNPACK kernels: its fallback ran d16's
    fc1/fc2/proj weight gradients at ~31 GFLOP/s against ~90 for YNNPACK, 13 s of a 40 s step
    (docs/benchmarks.md). So on CPU X^T is materialised first and the dot is a plain
    (K, T) @ (T, N) product. The transpose sits alone in a `lax.cond` whose two branches are the
    same transpose: the cond only keeps XLA from fusing it with the slice of nnx.scan's stacked
    residuals, a fused loop ~25x slower than XLA's transpose kernel (0.27 s per layer at d16).
    """
    if dimension_numbers is not None and dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
        raise ValueError(f'dense contracts the last axis of x with the first of w, got {dimension_numbers}')
    if out_sharding is not None:
        raise ValueError('dense takes no out_sharding (constrain the output instead)')
    return dense_matmul(x, w, precision, None if preferred_element_type is None else jnp.dtype(preferred_element_type))


def _contract_last_first(x, w, precision, preferred):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_matmul(x, w, precision, preferred):
    """`dense` as a custom-VJP function (looked up while tracing: `bench train --baseline
    autodiff_dense` swaps in `dense_autodiff`)."""
    return _contract_last_first(x, w, precision, preferred)


def dense_autodiff(x, w, precision, preferred):
    """The same product differentiated by JAX."""
    return _contract_last_first(x, w, precision, preferred)


def _dense_fwd(x, w, precision, preferred):
    return _contract_last_first(x, w, precision, preferred), (x, w)


def _dense_bwd(precision, preferred, res, g):
    x, w = res
    _, vjp = jax.vjp(lambda x, w: _contract_last_first(x, w, precision, preferred), x, w)
    dx = vjp(g)[0]  # autodiff's

    def on_cpu(x, g):  # autodiff's weight-gradient dot, X^T materialised first
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        transpose = lambda t: t.T  # noqa: E731
        xt = jax.lax.cond(jnp.sum(g.reshape(-1)[:1]) > 0, transpose, transpose, x)  # either branch: X^T, unfused
        return jax.lax.dot_general(xt, g, (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=w.dtype)

    dw = jax.lax.platform_dependent(x, g, cpu=on_cpu, default=lambda x, g: vjp(g)[1])
    return dx, dw


dense_matmul.defvjp(_dense_fwd, _dense_bwd)


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(F32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=None)
def scale_ids(patch_nums: tuple[int, ...]) -> np.ndarray:
    """Scale index of every token position, (L,) int32 (official `lvl_1L`)."""
    return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(patch_nums)])


@functools.lru_cache(maxsize=None)
def block_causal_mask(patch_nums: tuple[int, ...]) -> np.ndarray:
    """(L, L) bool, True where query q may attend key k: scale(q) >= scale(k)."""
    d = scale_ids(patch_nums)
    return d[:, None] >= d[None, :]


def scale_bounds(patch_nums: tuple[int, ...]) -> list[tuple[int, int]]:
    """[begin, end) token positions of every scale."""
    ends = np.cumsum([p * p for p in patch_nums]).tolist()
    return [(e - p * p, e) for e, p in zip(ends, patch_nums)]


# ---------------------------------------------------------------------------- attention
# Block-causal attention: a query of scale i attends the keys of scales <= i, so row block i of the
# (L, L) logits is needed only up to column end_i. Of d16's 680^2 logits 62 % are needed; the
# masked rest is computed and thrown away by 'xla' and 'jax'. `VARConfig.attention` picks:
#   'xla'        einsum logits (B, H, L, L), -inf where masked, float32 softmax, einsum with v
#   'jax'        jax.nn.dot_product_attention with the full mask (XLA's implementation)
#   'blockwise'  'xla' per group of scales against only its key prefix (`attention_groups`)
#   'cudnn'      jax.nn.dot_product_attention(implementation='cudnn'), GPU, bf16/fp16 only
#   'splash'     Pallas splash attention (TPU), sequence padded to SPLASH_BLOCK, a block mask
#                from the scale ids: wholly masked (q, k) blocks are skipped by the kernel
# With the KV cache (sampling) the queries are one whole scale against the cached prefix: no
# mask, nothing masked to skip; 'blockwise' and 'splash' run the 'xla' einsums there.
ATTENTION_IMPLEMENTATIONS = ATTENTION
# 'blockwise': consecutive scales are merged into one masked group until it holds this many query
# tokens; then a new group starts. 128 was fastest on CPU for d16 shapes (docs/benchmarks.md).
BLOCKWISE_MIN_TOKENS = 128
SPLASH_BLOCK = 128  # splash block size (q and kv); the sequence is padded to a multiple of it


@functools.lru_cache(maxsize=None)
def attention_groups(patch_nums: tuple[int, ...], min_tokens: int) -> tuple[tuple[int, int, bool], ...]:
    """Query groups of 'blockwise' attention: ((begin, end, masked), ...).

    Queries [begin, end) attend keys [0, end): exactly their prefix when the group is one scale
    (`masked` False: no mask at all), and the group's own block-causal mask when it merges several
    small scales (fewer, larger einsums; the few masked logits inside cost less than more ops).
    """
    bounds, groups, first = scale_bounds(patch_nums), [], 0
    for si, (_, end) in enumerate(bounds):
        begin = bounds[first][0]
        if end - begin >= min_tokens or si == len(bounds) - 1:
            groups.append((begin, end, si > first))
            first = si + 1
    return tuple(groups)


def _require_backend(implementation: str, backend: str) -> None:
    if jax.default_backend() != backend:
        raise ValueError(f"attention={implementation!r} runs on {backend.upper()} only, this is "
                         f"{jax.default_backend().upper()}: use attention='xla' or 'blockwise'")


def _softmax_attend(q, k, v, mask):
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=F32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def _blockwise_attend(q, k, v, patch_nums):
    mask = block_causal_mask(patch_nums)
    outs = [_softmax_attend(q[:, b:e], k[:, :e], v[:, :e], jnp.asarray(mask[b:e, :e]) if masked else None)
            for b, e, masked in attention_groups(patch_nums, BLOCKWISE_MIN_TOKENS)]
    return jnp.concatenate(outs, axis=1)


def _cudnn_attend(q, k, v, mask):
    _require_backend('cudnn', 'gpu')
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got {q.dtype}")
    m = None if mask is None else jnp.asarray(mask)[None, None]  # (1, 1, Lq, Lk): cuDNN turns it into a bias
    return jax.nn.dot_product_attention(q, k, v, mask=m, scale=1.0, implementation='cudnn')


@functools.lru_cache(maxsize=None)
def _splash_kernel(patch_nums: tuple[int, ...], heads: int, interpret: bool):
    """-> (splash MHA kernel for the padded block-causal mask, padded length).

    Padding positions get scale id K (past the last scale): real queries never see them, and the
    padding queries see every key (no empty softmax row); their outputs are dropped."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # noqa: PLC0415  (TPU kernels: only for attention='splash')
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask  # noqa: PLC0415

    length = sum(p * p for p in patch_nums)
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    ids = np.concatenate([scale_ids(patch_nums), np.full(padded - length, len(patch_nums), np.int32)])
    mask = splash_mask.MultiHeadMask([splash_mask.NumpyMask(ids[:, None] >= ids[None, :])] * heads)
    n = SPLASH_BLOCK
    blocks = splash.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n, block_kv_dkv=n,
                               block_kv_dkv_compute=n, block_q_dq=n, block_kv_dq=n)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret), padded


def _splash_attend(q, k, v, patch_nums, interpret=False):
    if not interpret:
        _require_backend('splash', 'tpu')
    b, length, h, _ = q.shape
    kernel, padded = _splash_kernel(tuple(patch_nums), h, bool(interpret))
    # (B, L, H, D) -> (B, H, L_padded, D); the kernel works on one batch row
    q, k, v = (jnp.pad(t, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for t in (q, k, v))
    out = jax.vmap(kernel)(q, k, v)
    return out.transpose(0, 2, 1, 3)[:, :length]


def attend(q, k, v, mask, implementation: str = 'xla', patch_nums: tuple[int, ...] | None = None,
           interpret: bool = False):
    """softmax(q k^T + mask) v for q (B, Lq, H, D), k/v (B, Lk, H, D); mask (Lq, Lk) bool or None.

    q must already carry its scale. Logits and softmax in float32 ('xla', 'blockwise').
    'blockwise' and 'splash' use the structure of the mask instead of the mask: with a mask it
    must be `block_causal_mask(patch_nums)`. `interpret` runs splash in Pallas' interpreter
    (any backend; for tests).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f'unknown attention implementation {implementation!r}; '
                         f'expected one of {ATTENTION_IMPLEMENTATIONS}')
    if implementation == 'cudnn':
        return _cudnn_attend(q, k, v, mask)
    if implementation == 'jax':
        m = None if mask is None else jnp.broadcast_to(mask, (q.shape[0], q.shape[2]) + mask.shape)
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=1.0)
    if mask is not None and implementation in ('blockwise', 'splash'):
        if patch_nums is None or mask.shape != (sum(p * p for p in patch_nums),) * 2:
            raise ValueError(f'attention={implementation!r} needs the block-causal mask of patch_nums')
        if implementation == 'splash':
            return _splash_attend(q, k, v, patch_nums, interpret)
        return _blockwise_attend(q, k, v, patch_nums)
    return _softmax_attend(q, k, v, mask)


def check_attention(implementation: str, *, patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                    batch: int = 2, heads: int = 4, head_dim: int = 64, dtype=None, seed: int = 0,
                    interpret: bool = False) -> dict[str, float]:
    """Compare `implementation` with 'xla' on random inputs, on the current default backend.

    Checks the teacher-forcing path (block-causal mask; output and the gradients of q, k, v) and
    the KV-cache path (the last scale against the whole prefix, no mask). The reference is 'xla'
    in float32 on the same (dtype-rounded) inputs. Returns the max |difference| of each over the
    reference's max |entry|, and raises AssertionError when one exceeds the dtype's tolerance.
    For device scripts:
        python -c "from var_jax.models.var import check_attention as c; print(c('cudnn'))"
    dtype defaults to bfloat16 for 'cudnn' (its only kind) and float32 otherwise.
    """
    dtype = jnp.dtype(dtype or (jnp.bfloat16 if implementation == 'cudnn' else jnp.float32))
    length = sum(p * p for p in patch_nums)
    keys = jax.random.split(jax.random.key(seed), 4)
    # l2-normalised q times a scale as in SelfAttention: logits in [-s, s]
    q, k = (_l2_normalize(jax.random.normal(key, (batch, length, heads, head_dim))) for key in keys[:2])
    q = q * 10.0
    v = jax.random.normal(keys[2], (batch, length, heads, head_dim))
    g = jax.random.normal(keys[3], (batch, length, heads, head_dim))
    q, k, v = (t.astype(dtype) for t in (q, k, v))
    mask = jnp.asarray(block_causal_mask(tuple(patch_nums)))

    def loss(impl, cast):
        def f(q, k, v):
            q, k, v = (t.astype(cast) for t in (q, k, v))
            out = attend(q, k, v, mask, impl, tuple(patch_nums), interpret)
            return jnp.sum(out.astype(F32) * g), out.astype(F32)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss(implementation, dtype)(q, k, v)
    (_, ref), ref_grads = loss('xla', F32)(q, k, v)
    begin = length - patch_nums[-1] ** 2  # cache path: the last scale against every key
    cached = jax.jit(lambda q, k, v: attend(q[:, begin:], k, v, None, implementation, tuple(patch_nums),
                                            interpret))(q, k, v).astype(F32)
    def err(a, b):  # relative to the reference's largest entry
        a, b = a.astype(F32), b.astype(F32)
        return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))

    errors = {'output': err(out, ref), **{f'grad_{n}': err(a, b) for n, a, b in zip('qkv', grads, ref_grads)},
              'cached_output': err(cached, ref[:, begin:])}
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16 keeps 8 significant bits
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f'attention={implementation!r} differs from xla by more than {tol}: {bad}'
    return errors


class SelfAttention(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        c, h = cfg.C, cfg.H
        d = c // h
        self.cfg = cfg
        # qkv kernel kept as (C, 3, H, D) so tensor parallelism splits whole heads.
        self.mat_qkv = nnx.Param(trunc_normal(cfg.std)(rngs.params(), (c, 3, h, d)),
                                 **_axes('embed', None, 'heads', 'head_dim'))
        self.q_bias = nnx.Param(jnp.zeros((h, d), F32), **_axes('heads', 'head_dim'))
        self.v_bias = nnx.Param(jnp.zeros((h, d), F32), **_axes('heads', 'head_dim'))
        # the k bias is a fixed zero buffer in the official code: no parameter here.
        if cfg.attn_l2_norm:
            self.scale_mul = nnx.Param(jnp.full((h,), math.log(4.0), F32), **_axes('heads'))
        self.proj = nnx.Linear(c, c, kernel_init=trunc_normal(cfg.std, 1 / math.sqrt(2 * cfg.depth)),
                               dtype=to_jnp_dtype(cfg.dtype), dot_general=dense, rngs=rngs,
                               kernel_metadata=_axes('heads', 'embed'), bias_metadata=_axes('embed'))

    def __call__(self, x, *, mask=None, cache=None, start: int = 0):
        """x (B, l, C). With `cache` = (k, v) of (B, L, H, D), writes this chunk at `start` and
        attends to every cached position before `start + l` (no mask needed: the chunk is one
        whole scale). Returns (out, cache)."""
        cfg, dtype = self.cfg, to_jnp_dtype(self.cfg.dtype)
        b, l, c = x.shape
        qkv = jnp.einsum('blc,cthd->blthd', x.astype(dtype), self.mat_qkv[...].astype(dtype))
        q = qkv[:, :, 0] + self.q_bias[...].astype(dtype)
        k = qkv[:, :, 1]
        v = qkv[:, :, 2] + self.v_bias[...].astype(dtype)
        if cfg.attn_l2_norm:
            scale = jnp.exp(jnp.minimum(self.scale_mul[...], LOG_100))
            q = _l2_normalize(q) * scale[:, None]
            k = _l2_normalize(k)
        else:
            q = q * (0.25 / math.sqrt(q.shape[-1]))
        q, k, v = (constrain(t.astype(dtype), ('batch', None, 'heads', None)) for t in (q, k, v))
        if cache is not None:
            k_all = jax.lax.dynamic_update_slice(cache[0], k, (0, start, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache[1], v, (0, start, 0, 0))
            cache = (k_all, v_all)
            k, v = k_all[:, :start + l], v_all[:, :start + l]
        out = attend(q, k, v, mask, cfg.attention, cfg.patch_nums).reshape(b, l, c)
        return self.proj(out), cache


class FFN(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        c, hidden, dtype = cfg.C, round(cfg.C * cfg.mlp_ratio), to_jnp_dtype(cfg.dtype)
        self.fc1 = nnx.Linear(c, hidden, kernel_init=trunc_normal(cfg.std), dtype=dtype, dot_general=dense, rngs=rngs,
                              kernel_metadata=_axes('embed', 'mlp'), bias_metadata=_axes('mlp'))
        self.fc2 = nnx.Linear(hidden, c, kernel_init=trunc_normal(cfg.std, 1 / math.sqrt(2 * cfg.depth)),
                              dtype=dtype, dot_general=dense, rngs=rngs, kernel_metadata=_axes('mlp', 'embed'),
                              bias_metadata=_axes('embed'))

    def __call__(self, x):
        h = constrain(self.fc1(x), ('batch', None, 'mlp'))
        return self.fc2(jax.nn.gelu(h, approximate=True))


def _drop_path(x, rate, key):
    """Per-sample stochastic depth (timm): drop the branch with prob `rate`, scale by 1/keep."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class AdaLNSelfAttn(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        c = cfg.C
        self.cfg = cfg
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.ffn = FFN(cfg, rngs=rngs)
        # rows [gamma1, gamma2 | scale1, scale2, shift1, shift2]: gammas start at init_adaln_gamma
        col_scale = np.concatenate([np.full(2 * c, cfg.init_adaln_gamma), np.full(4 * c, cfg.init_adaln)])
        if cfg.shared_aln:
            gss = jax.random.normal(rngs.params(), (6, c), F32) / math.sqrt(c)
            self.ada_gss = nnx.Param(gss * col_scale.reshape(6, c), **_axes(None, 'embed'))
        else:
            self.ada_lin = nnx.Linear(c, 6 * c, kernel_init=trunc_normal(cfg.std, col_scale),
                                      dtype=to_jnp_dtype(cfg.dtype), rngs=rngs,
                                      kernel_metadata=_axes('embed', None), bias_metadata=_axes(None))

    def __call__(self, x, cond, *, mask=None, cache=None, start=0, drop_rate=0.0, rng=None):
        """x (B, l, C) float32 residual stream; cond (B, C), or (B, 6, C) with shared AdaLN."""
        cfg = self.cfg
        if cfg.shared_aln:
            mod = self.ada_gss[...][None] + cond
        else:
            mod = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 6, cfg.C)
        g1, g2, s1, s2, b1, b2 = (m.astype(F32) for m in jnp.split(mod, 6, axis=1))  # each (B, 1, C)
        dtype = to_jnp_dtype(cfg.dtype)

        h, cache = self.attn((layer_norm(x, cfg.norm_eps) * (1 + s1) + b1).astype(dtype),
                             mask=mask, cache=cache, start=start)
        h = h.astype(F32) * g1
        if rng is not None:
            h = _drop_path(h, drop_rate, jax.random.fold_in(rng, 0))
        x = x + h
        h = self.ffn((layer_norm(x, cfg.norm_eps) * (1 + s2) + b2).astype(dtype)).astype(F32) * g2
        if rng is not None:
            h = _drop_path(h, drop_rate, jax.random.fold_in(rng, 1))
        x = constrain(x + h, ('batch', None, None))
        return x, cache


class AdaLNBeforeHead(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ada_lin = nnx.Linear(cfg.C, 2 * cfg.C, kernel_init=trunc_normal(cfg.std, cfg.init_adaln),
                                  dtype=to_jnp_dtype(cfg.dtype), rngs=rngs,
                                  kernel_metadata=_axes('embed', None), bias_metadata=_axes(None))

    def __call__(self, x, cond):
        scale, shift = jnp.split(self.ada_lin(jax.nn.silu(cond)).astype(F32), 2, axis=-1)
        return layer_norm(x, self.cfg.norm_eps) * (1 + scale[:, None]) + shift[:, None]


class VAR(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        c, std, dtype = cfg.C, cfg.std, to_jnp_dtype(cfg.dtype)
        first_l = cfg.patch_nums[0] ** 2
        self.word_embed = nnx.Linear(cfg.cvae, c, kernel_init=trunc_normal(std), dtype=dtype, rngs=rngs,
                                     kernel_metadata=_axes(None, 'embed'), bias_metadata=_axes('embed'))
        self.class_emb = nnx.Embed(cfg.num_classes + 1, c, embedding_init=trunc_normal(std), rngs=rngs,
                                   embedding_metadata=_axes('classes', 'embed'))
        self.pos_start = nnx.Param(trunc_normal(std)(rngs.params(), (1, first_l, c)), **_axes(None, None, 'embed'))
        self.pos_1LC = nnx.Param(trunc_normal(std)(rngs.params(), (1, cfg.L, c)), **_axes(None, None, 'embed'))
        self.lvl_embed = nnx.Embed(len(cfg.patch_nums), c, embedding_init=trunc_normal(std), rngs=rngs,
                                   embedding_metadata=_axes(None, 'embed'))
        if cfg.shared_aln:
            self.shared_ada_lin = nnx.Linear(c, 6 * c, kernel_init=trunc_normal(std), dtype=dtype, rngs=rngs,
                                             kernel_metadata=_axes('embed', None), bias_metadata=_axes(None))

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=STACK)
        def make_blocks(rngs):
            return AdaLNSelfAttn(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.head_nm = AdaLNBeforeHead(cfg, rngs=rngs)
        self.head = nnx.Linear(c, cfg.vocab_size, kernel_init=trunc_normal(std, cfg.init_head), dtype=dtype,
                               rngs=rngs, kernel_metadata=_axes('embed', 'vocab'), bias_metadata=_axes('vocab'))

    # ------------------------------------------------------------------ pieces
    def lvl_pos(self) -> jax.Array:
        """(1, L, C) level + absolute position embedding of every token position."""
        return self.lvl_embed(jnp.asarray(scale_ids(self.config.patch_nums)))[None] + self.pos_1LC[...]

    def condition(self, labels):
        """labels (B,) -> (cond (B, C) for the head and sos, block conditioning)."""
        cond = self.class_emb(labels).astype(F32)
        if self.config.shared_aln:
            return cond, self.shared_ada_lin(jax.nn.silu(cond)).astype(F32).reshape(-1, 6, self.config.C)
        return cond, cond

    def run_blocks(self, x, block_cond, *, mask=None, cache=None, start=0, rng=None):
        """All blocks via one scanned block. `cache`: (k, v) stacked over depth, or None."""
        cfg = self.config
        dprs = jnp.asarray(np.linspace(0.0, cfg.dpr, cfg.depth), F32)
        # drop-path at rate 0 is the identity (the official code builds nn.Identity): no keys, no masks
        keys = None if rng is None or cfg.dpr == 0 else jax.random.split(rng, cfg.depth)

        def block_fn(block, x, layer_cache, dpr, key):
            return block(x, block_cond, mask=mask, cache=layer_cache, start=start, drop_rate=dpr, rng=key)

        if cfg.remat != 'none':
            policy = None if cfg.remat == 'block' else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
            block_fn = nnx.remat(block_fn, policy=policy)

        @nnx.scan(in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata=STACK,
                  unroll=1 if cfg.scan_layers else True)
        def scan_fn(block, x, layer_cache, dpr, key):
            return block_fn(block, x, layer_cache, dpr, key)

        return scan_fn(self.blocks, x, cache, dprs, keys)

    def head_logits(self, x, cond):
        """(B, l, C) residual stream -> (B, l, V) float32 logits.

        The matmul takes `config.dtype` inputs but accumulates *and returns* float32: a bfloat16
        output would round every logit to 8 significant bits before the cast (the official fp16
        autocast keeps 11), and guidance (1 + t) a - t b amplifies that rounding.
        """
        dtype = to_jnp_dtype(self.config.dtype)
        h = self.head_nm(x, cond).astype(dtype)
        logits = dense(h, self.head.kernel[...].astype(dtype), preferred_element_type=F32)
        return constrain(logits + self.head.bias[...].astype(F32), ('batch', None, 'vocab'))

    # ------------------------------------------------------------------ teacher forcing
    def __call__(self, labels, var_input, *, train: bool = False, rng=None):
        """labels (B,) int in [0, num_classes] (num_classes = null class), var_input
        (B, L - pn_0^2, Cvae) -> logits (B, L, V) float32.

        With `train=True` (needs `rng`): label dropout (`cond_drop_rate`) and drop-path.
        Outside training nothing is random (unlike the official forward, which always drops labels).
        """
        cfg = self.config
        labels, var_input = self.check_inputs(labels, var_input)
        if train:
            if rng is None:
                raise ValueError('VAR(train=True) needs an rng key')
            rng, k_label = jax.random.split(rng)
            drop = jax.random.uniform(k_label, labels.shape) < cfg.cond_drop_rate
            labels = jnp.where(drop, cfg.num_classes, labels)
        else:
            rng = None
        cond, block_cond = self.condition(labels)
        first_l = cfg.patch_nums[0] ** 2
        sos = jnp.broadcast_to(cond[:, None, :], (cond.shape[0], first_l, cfg.C)) + self.pos_start[...]
        x = jnp.concatenate([sos, self.word_embed(var_input.astype(F32)).astype(F32)], axis=1)
        x = constrain(x + self.lvl_pos(), ('batch', None, None))
        mask = jnp.asarray(block_causal_mask(cfg.patch_nums))
        x, _ = self.run_blocks(x, block_cond, mask=mask, rng=rng)
        return self.head_logits(x, cond)

    def check_inputs(self, labels, var_input):
        cfg = self.config
        labels, var_input = jnp.asarray(labels), jnp.asarray(var_input)
        want = (cfg.L - cfg.patch_nums[0] ** 2, cfg.cvae)
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f'labels must be integer (B,), got {labels.dtype} {labels.shape}')
        if var_input.ndim != 3 or var_input.shape[1:] != want or var_input.shape[0] != labels.shape[0]:
            raise ValueError(f'var_input must be (B={labels.shape[0]}, {want[0]}, {want[1]}), got {var_input.shape}')
        if not isinstance(labels, jax.core.Tracer) and labels.size:  # concrete: check on the host
            host = np.asarray(labels)
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi > cfg.num_classes:
                raise ValueError(f'labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = unconditional), '
                                 f'got [{lo}, {hi}]')
        return labels.astype(jnp.int32), var_input

    # ------------------------------------------------------------------ KV-cached inference
    def init_cache(self, batch: int):
        cfg = self.config
        shape = (cfg.depth, batch, cfg.L, cfg.H, cfg.C // cfg.H)
        z = jnp.zeros(shape, to_jnp_dtype(cfg.dtype))
        return z, z

    def first_input(self, cond) -> jax.Array:
        """Input of scale 0: class embedding + pos_start + its level/position embedding."""
        first_l = self.config.patch_nums[0] ** 2
        return cond[:, None, :] + self.pos_start[...] + self.lvl_pos()[:, :first_l]

    def scale_input(self, si: int, x_cvae) -> jax.Array:
        """Input of scale si >= 1 from f_hat downsampled to that scale, (B, pn^2, Cvae)."""
        begin, end = scale_bounds(self.config.patch_nums)[si]
        return self.word_embed(x_cvae.astype(F32)).astype(F32) + self.lvl_pos()[:, begin:end]

    def step(self, si: int, x, cond, block_cond, cache):
        """Run scale si's tokens (B, pn^2, C) through the network with the KV cache.

        Returns (logits (B, pn^2, V), cache)."""
        begin, _ = scale_bounds(self.config.patch_nums)[si]
        x, cache = self.run_blocks(x, block_cond, cache=cache, start=begin)
        return self.head_logits(x, cond), cache
