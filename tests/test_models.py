"""Model structure: parameter counts, Phi table, resizes vs torch, mask, precision, bad input."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_PNS, TINY_VAR, TINY_VQ
from flax import nnx

from var_jax.io.checkpoint import merge_params
from var_jax.models import (
    PATCH_NUMS_256,
    PATCH_NUMS_512,
    VARConfig,
    VQVAEConfig,
    abstract,
    check_pair,
    create,
    var_config,
    vqvae_config,
)
from var_jax.models import var as var_module
from var_jax.models.quantizer import phi_table
from var_jax.models.resize import area_matrix, bicubic_matrix, resize
from var_jax.models.var import attention_groups, block_causal_mask, check_attention, scale_bounds


def n_params(cfg) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract(cfg), nnx.Param)))


@pytest.mark.parametrize('depth,count', [(16, 310_283_520), (20, 600_917_136), (24, 1_033_399_360),
                                         (30, 2_010_020_356), (36, 2_353_893_904)])
def test_official_var_parameter_counts(depth, count):
    assert n_params(var_config(depth)) == count


def test_official_vqvae_parameter_count():
    assert n_params(vqvae_config()) == 108_948_355


def test_d36_is_the_512px_shared_adaln_model():
    cfg = var_config(36)
    assert cfg.shared_aln and cfg.patch_nums == PATCH_NUMS_512 and cfg.L == 2240


def test_phi_table():
    assert phi_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # si=2, 7 are float64 ties
    assert phi_table(10, 1) == (0,) * 10
    assert phi_table(10, 0) == tuple(range(10))
    assert phi_table(4, 4) == (0, 1, 2, 3)


TORCH = dict(np.load(pathlib.Path(__file__).parent / 'data' / 'torch_resize.npz'))


@pytest.mark.parametrize('name', sorted(TORCH))
def test_resize_matrices_equal_torch(name):
    kind, n_in, n_out = name.split('_')
    make = area_matrix if kind == 'area' else bicubic_matrix
    np.testing.assert_allclose(make(int(n_in), int(n_out)), TORCH[name], rtol=0, atol=2e-7)


def test_resize_applies_both_axes():
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    m = TORCH['bicubic_5_16']
    small = np.asarray(resize(jnp.asarray(x), 5, 'area'))
    np.testing.assert_allclose(small, np.einsum('oh,bhwc,pw->bopc', TORCH['area_16_5'], x, TORCH['area_16_5']),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(resize(jnp.asarray(small), 16, 'bicubic')),
                               np.einsum('oh,bhwc,pw->bopc', m, small, m), atol=1e-5)
    assert resize(x, 16, 'area') is x


def test_block_causal_mask():
    mask = block_causal_mask(PATCH_NUMS_256)
    assert mask.shape == (680, 680)
    bounds = scale_bounds(PATCH_NUMS_256)
    for si, (b, e) in enumerate(bounds):
        assert mask[b:e, :e].all(), 'a scale sees itself and every earlier scale'
        assert not mask[b:e, e:].any(), 'and nothing later'


def test_logits_depend_only_on_own_and_earlier_scales(tiny_var):
    """Perturb the input of one scale: logits before it are unchanged, from it on they change."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, TINY_VAR.L - 1, TINY_VAR.cvae)).astype(np.float32)
    labels = np.array([1, 2])
    base = np.asarray(tiny_var(labels, x))
    b, e = scale_bounds(TINY_PNS)[2]  # scale 2 occupies input rows b-1 .. e-1 (row 0 is the class token)
    x2 = x.copy()
    x2[:, b - 1:e - 1] += 1.0
    out = np.asarray(tiny_var(labels, x2))
    np.testing.assert_array_equal(out[:, :b], base[:, :b])
    assert np.abs(out[:, b:e] - base[:, b:e]).min() > 0, 'tokens of the same scale see each other'


def test_training_mode_randomness(tiny_var):
    x = np.random.default_rng(0).normal(size=(4, TINY_VAR.L - 1, TINY_VAR.cvae)).astype(np.float32)
    labels = np.arange(4)
    eval_logits = np.asarray(tiny_var(labels, x))
    np.testing.assert_array_equal(eval_logits, np.asarray(tiny_var(labels, x)))
    with pytest.raises(ValueError, match='rng'):
        tiny_var(labels, x, train=True)
    fwd = nnx.jit(lambda m, y, x, k: m(y, x, train=True, rng=k))
    a, b = fwd(tiny_var, labels, x, jax.random.key(1)), fwd(tiny_var, labels, x, jax.random.key(2))
    assert not np.allclose(a, b), 'label dropout / drop-path use the key'
    np.testing.assert_array_equal(a, fwd(tiny_var, labels, x, jax.random.key(1)))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = TINY_VAR.replace(dtype='bfloat16')
    var32, var16 = create(TINY_VAR, seed=3), create(cfg, seed=3)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(var16, nnx.Param)))
    x = np.random.default_rng(0).normal(size=(2, cfg.L - 1, cfg.cvae)).astype(np.float32)
    lo, hi = var16(np.array([0, 1]), x), var32(np.array([0, 1]), x)
    assert lo.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lo - hi))) < 0.05 * float(jnp.max(jnp.abs(hi))) + 0.05


def test_layer_norm_backward_equals_autodiff():
    """The hand-written LayerNorm backward (faster on XLA CPU) is the autodiff one."""
    x = jax.random.normal(jax.random.key(0), (3, 7, 64)) * 3 + 1
    g = jax.random.normal(jax.random.key(1), x.shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = x.astype(dtype)
        out, vjp = jax.vjp(lambda t: var_module.layer_norm(t, 1e-6), xd)
        ref, vjp_ref = jax.vjp(lambda t: var_module.layer_norm_autodiff(t, 1e-6), xd)
        np.testing.assert_array_equal(out, ref)
        (dx,), (dx_ref,) = vjp(g), vjp_ref(g)
        assert dx.dtype == dtype
        np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype,preferred', [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)])
def test_dense_equals_autodiff(dtype, preferred):
    """`dense` (the Linears' dot_general and the head) has autodiff's forward and gradients; only the
    summation order of the CPU weight gradient differs."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 16)).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (16, 24)).astype(dtype)
    g = jax.random.normal(jax.random.key(2), (3, 5, 24))

    def run(matmul):
        out, vjp = jax.vjp(matmul, x, w)
        return out, vjp(g.astype(out.dtype))

    def plain(x, w):
        return jax.lax.dot_general(x, w, (((2,), (0,)), ((), ())), preferred_element_type=preferred)

    (out, (dx, dw)), (ref, (dx_ref, dw_ref)) = run(jax.jit(
        lambda x, w: var_module.dense(x, w, preferred_element_type=preferred))), run(jax.jit(plain))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert (dx.dtype, dw.dtype) == (dtype, dtype)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(dw_ref, np.float32), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match='contracts the last axis'):
        var_module.dense(x, w.T, (((2,), (1,)), ((), ())))


def _dots_with_transposed_lhs(hlo: str) -> list[str]:
    """Unfused dots contracting the first axis of their lhs: XLA:CPU's slow fallback (not YNNPACK)."""
    return [line for line in hlo.splitlines()
            if ' dot(' in line and 'lhs_contracting_dims={0}' in line and 'fused_computation' not in line]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the layout fix is for XLA:CPU')
def test_dense_weight_gradient_runs_on_the_fast_cpu_kernels():
    """Under a layer scan (as VAR's blocks), autodiff's weight gradient is a dot XLA:CPU leaves to its
    slow fallback; `dense`'s is not (docs/benchmarks.md: 13 s of a 40 s d16 step)."""
    ws, x = jnp.full((2, 128, 128), 0.01), jnp.ones((256, 128))

    def grad_hlo(matmul):
        def loss(ws, x):
            y, _ = jax.lax.scan(lambda c, w: (c + matmul(c, w), None), x, ws)
            return jnp.sum(y * y)
        return jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text()

    assert _dots_with_transposed_lhs(grad_hlo(jnp.matmul))  # what autodiff gives: the check can fail
    assert not _dots_with_transposed_lhs(grad_hlo(var_module.dense))


@pytest.mark.slow
@pytest.mark.parametrize('name,autodiff', [('layer_norm', var_module.layer_norm_autodiff),
                                           ('dense_matmul', var_module.dense_autodiff)])
def test_var_gradient_unchanged_by_the_custom_backwards(tiny_var, monkeypatch, name, autodiff):
    x = np.random.default_rng(0).normal(size=(2, TINY_VAR.L - 1, TINY_VAR.cvae)).astype(np.float32)
    graphdef, params = nnx.split(tiny_var, nnx.Param)

    def grads():
        def loss(p):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(np.array([1, 2]), x)))

        return jax.grad(loss)(params)

    custom = grads()
    monkeypatch.setattr(var_module, name, autodiff)
    for a, b in zip(jax.tree.leaves(custom), jax.tree.leaves(grads())):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('kw,match', [
    (dict(ch=48), 'divisible by num_groups'),
    (dict(patch_nums=(1, 3, 2)), 'strictly increasing'),
    (dict(patch_nums=(0, 1)), 'positive'),
    (dict(dtype='float8'), 'unknown dtype'),
])
def test_vqvae_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        VQVAEConfig(**kw)


@pytest.mark.parametrize('kw,match', [
    (dict(width=100, num_heads=3), 'not divisible'),
    (dict(cond_drop_rate=1.0), 'cond_drop_rate'),
    (dict(attention='flash'), 'attention'),
])
def test_var_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        VARConfig(**kw)


def test_mismatched_pair():
    with pytest.raises(ValueError, match='patch_nums differ'):
        check_pair(TINY_VQ, TINY_VAR.replace(patch_nums=(1, 2, 4)))
    with pytest.raises(ValueError, match='vocab_size differs'):
        check_pair(TINY_VQ, TINY_VAR.replace(vocab_size=32))


def test_tokenizer_input_errors(tiny_vqvae):
    with pytest.raises(ValueError, match='NHWC'):
        tiny_vqvae.img_to_idx(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r'\[-1, 1\]'):
        tiny_vqvae.img_to_idx(np.full((1, 8, 8, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match='floating'):
        tiny_vqvae.img_to_idx(np.zeros((1, 8, 8, 3), np.uint8))
    idx = tiny_vqvae.img_to_idx(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match='one per scale'):
        tiny_vqvae.idx_to_img(idx[:-1])
    with pytest.raises(ValueError, match='token ids'):
        tiny_vqvae.idx_to_img(idx[:-1] + [idx[-1] + 1000])


def test_var_input_errors(tiny_var):
    x = np.zeros((2, TINY_VAR.L - 1, TINY_VAR.cvae), np.float32)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 10\]'):
        tiny_var(np.array([0, 11]), x)
    with pytest.raises(ValueError, match='var_input must be'):
        tiny_var(np.array([0, 1]), x[:, 1:])
    with pytest.raises(ValueError, match='integer'):
        tiny_var(np.array([0.0, 1.0]), x)


def test_bfloat16_head_returns_float32_logits_unrounded():
    """The head matmul takes bfloat16 inputs but returns float32 (not bf16 rounded then cast):
    guidance (1 + t) a - t b would amplify a bf16 rounding of the logits."""
    var16 = create(TINY_VAR.replace(dtype='bfloat16'), seed=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, TINY_VAR.C)), jnp.float32)
    cond = jnp.asarray(rng.normal(size=(2, TINY_VAR.C)), jnp.float32)
    got = np.asarray(var16.head_logits(x, cond))
    assert got.dtype == np.float32
    h = var16.head_nm(x, cond).astype(jnp.bfloat16)
    k, bias = var16.head.kernel[...].astype(jnp.bfloat16), var16.head.bias[...]
    # reference: the same bf16 inputs, products and sums in float64 (bf16 * bf16 is exact in float32)
    want = np.asarray(h, np.float64) @ np.asarray(k, np.float64) + np.asarray(bias, np.float64)
    rounded = np.asarray(jnp.dot(h, k).astype(jnp.float32) + bias)  # the old bf16-output head
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-5 * scale
    assert np.abs(rounded - want).max() > 100 * np.abs(got - want).max(), 'bf16 output rounds the logits'


# ---------------------------------------------------------------------------- attention implementations
def test_attention_groups_cover_the_queries_once():
    for pns in (PATCH_NUMS_256, PATCH_NUMS_512, TINY_PNS):
        bounds = scale_bounds(pns)
        for min_tokens in (1, 4, 64, 128, 10_000):
            groups = attention_groups(pns, min_tokens)
            assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == bounds[-1][1]
            ends = {e for _, e in bounds}
            assert all(e in ends for _, e, _ in groups), 'groups are whole scales'
            for b, e, masked in groups:
                assert masked == ((b, e) not in bounds), 'a one-scale group needs no mask'
    assert attention_groups(PATCH_NUMS_256, 64) == (
        (0, 91, True), (91, 155, False), (155, 255, False), (255, 424, False), (424, 680, False))


# splash runs in Pallas' interpreter here (the TPU kernel's own code, on the CPU)
@pytest.mark.parametrize('impl', ['xla', 'jax', 'blockwise', 'splash'])
def test_attention_implementations_equal_xla(impl):
    errors = check_attention(impl, patch_nums=(1, 2, 3, 4, 6, 8, 10), batch=1, heads=2, interpret=impl == 'splash')
    assert set(errors) == {'output', 'grad_q', 'grad_k', 'grad_v', 'cached_output'}


def test_attention_on_the_wrong_platform_is_a_one_line_error():
    for impl, where in (('cudnn', 'GPU'), ('splash', 'TPU')):
        with pytest.raises(ValueError, match=f'runs on {where} only') as e:
            check_attention(impl, patch_nums=(1, 2), heads=1)
        assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match="'bfloat16' or 'float16'"):
        VARConfig(attention='cudnn')
    VARConfig(attention='cudnn', dtype='bfloat16')  # valid anywhere; fails only when run off a GPU


@pytest.mark.parametrize('impl', ['jax', 'blockwise'])
@pytest.mark.slow
def test_var_logits_and_gradients_equal_xla(tiny_var, impl, monkeypatch):
    """The whole model with another attention: same logits and parameter gradients as 'xla'.
    Groups of >= 4 tokens make the tiny model's 'blockwise' run a masked group and two unmasked."""
    monkeypatch.setattr(var_module, 'BLOCKWISE_MIN_TOKENS', 4)
    assert len(attention_groups(TINY_PNS, 4)) == 3
    other = merge_params(TINY_VAR.replace(attention=impl), nnx.state(tiny_var, nnx.Param))
    x = np.random.default_rng(0).normal(size=(2, TINY_VAR.L - 1, TINY_VAR.cvae)).astype(np.float32)
    labels = np.array([1, 2])

    def logits_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        def f(p):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(labels, x)))

        return model(labels, x), jax.grad(f)(params)

    (a, ga), (b, gb) = logits_and_grads(tiny_var), logits_and_grads(other)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(w, u, rtol=1e-4, atol=1e-6)
