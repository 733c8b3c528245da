"""Sampler behaviour: official top-k/top-p semantics, seeding, no recompilation, bad arguments."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import sampling
from var_jax.sampling import filter_logits

from conftest import TINY_VAR


def official_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """numpy transcription of the official `sample_with_top_k_top_p_` masking (reference)."""
    logits = logits.astype(np.float64).copy()
    v = logits.shape[-1]
    if top_k > 0:
        kth = np.sort(logits, -1)[..., v - top_k][..., None]
        logits[logits < kth] = -np.inf
    if top_p > 0:
        order = np.argsort(logits, -1, kind='stable')
        srt = np.take_along_axis(logits, order, -1)
        p = np.exp(srt - srt.max(-1, keepdims=True))
        remove = np.cumsum(p / p.sum(-1, keepdims=True), -1) <= 1 - top_p
        remove[..., -1] = False
        np.put_along_axis(logits, order, np.where(remove, -np.inf, srt), -1)
    return logits


def kept(logits, top_k, top_p) -> np.ndarray:
    srt, order = filter_logits(jnp.asarray(logits), top_k, top_p)
    out = np.zeros(logits.shape, bool)
    np.put_along_axis(out, np.asarray(order), np.isfinite(np.asarray(srt)), -1)
    return out


@pytest.mark.parametrize('top_k,top_p', [(0, 0.0), (1, 0.0), (5, 0.0), (0, 0.5), (0, 0.96), (7, 0.9), (64, 0.3),
                                         (1000, 0.0), (3, 1.0), (0, 1e-6)])
def test_filter_matches_official(top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(6, 64)).astype(np.float32) * 2
    logits[0, :10] = logits[0, 0]  # ties
    want = np.isfinite(official_filter(logits, min(top_k, 64), top_p))
    np.testing.assert_array_equal(kept(logits, top_k, top_p), want)


def test_filter_edge_cases():
    logits = np.array([[1.0, 3.0, 3.0, 2.0, -5.0]], np.float32)
    assert kept(logits, 1, 0.0).tolist() == [[False, True, True, False, False]], 'top-k keeps ties'
    assert kept(logits, 0, 1e-9).sum() == 1 and kept(logits, 0, 1e-9)[0, 1:3].any(), 'top-p keeps the max'
    assert kept(logits, 0, 0.0).all() and kept(logits, 0, 1.0).all(), 'top_p 0 and 1 keep everything'
    assert kept(logits, 99, 0.0).all(), 'top_k above V keeps everything'


def test_top_k_limits_the_support():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 400)
    toks = jax.vmap(lambda k: sampling.sample_tokens(k, logits, 2, 0.0)[0])(keys)
    assert set(np.unique(toks)) == set(np.argsort(np.asarray(logits[0]))[-2:])


def test_sample_shapes_seeds_and_no_recompile(tiny_var, tiny_vqvae):
    labels = np.array([3, 7, 3])
    img, idx = sampling.sample(tiny_var, tiny_vqvae, labels, jax.random.key(0), cfg=1.5, top_k=10, top_p=0.9)
    assert img.shape == (3, 8, 8, 3) and img.dtype == jnp.float32
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert [i.shape for i in idx] == [(3, p * p) for p in TINY_VAR.patch_nums]
    traces = sampling.TRACE_COUNT['generate']
    img2, idx2 = sampling.sample(tiny_var, tiny_vqvae, labels, jax.random.key(0), cfg=1.5, top_k=10, top_p=0.9)
    np.testing.assert_array_equal(img, img2)
    sampling.sample(tiny_var, tiny_vqvae, labels, jax.random.key(1), cfg=3.0, top_k=0, top_p=0.0)
    assert sampling.TRACE_COUNT['generate'] == traces, 'same shapes must not retrace'
    img3, _ = sampling.sample(tiny_var, tiny_vqvae, labels, jax.random.key(5), cfg=1.5, top_k=10, top_p=0.9)
    assert not np.array_equal(img, img3)


def test_cfg_zero_skips_the_null_class_rows_without_changing_samples(tiny_var, tiny_vqvae):
    labels = np.array([1, 4, 9])
    img, idx, logits = sampling.sample(tiny_var, tiny_vqvae, labels, jax.random.key(2), cfg=0.0, top_k=5,
                                       top_p=0.0, return_logits=True)
    # the doubled-batch program with a (traced) guidance of 0: the same logits and tokens
    keys = sampling.row_keys(jax.random.key(2), 3)
    img2, idx2, _, logits2 = sampling._sample_jit(tiny_var, tiny_vqvae, jnp.asarray(labels, jnp.int32), keys,
                                                  jnp.float32(0), jnp.int32(5), jnp.float32(0), return_logits=True)
    np.testing.assert_allclose(logits, logits2, atol=1e-5)
    for a, b in zip(idx, idx2):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(img, img2, atol=1e-6)


def test_rows_do_not_depend_on_the_batch(tiny_var, tiny_vqvae):
    keys = jax.random.split(jax.random.key(0), 4)
    _, a = sampling.sample(tiny_var, tiny_vqvae, np.array([1, 2, 3, 4]), keys, cfg=2.0, top_k=0, top_p=0.0)
    _, b = sampling.sample(tiny_var, tiny_vqvae, np.array([3, 1]), keys[jnp.array([2, 0])], cfg=2.0, top_k=0,
                           top_p=0.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x)[[2, 0]], y)


def test_more_smooth(tiny_var, tiny_vqvae):
    img, idx = sampling.sample(tiny_var, tiny_vqvae, np.array([0, 1]), jax.random.key(0), cfg=1.0, top_k=5,
                               top_p=0.9, more_smooth=True)
    assert img.shape == (2, 8, 8, 3) and bool(jnp.isfinite(img).all())


@pytest.mark.parametrize('kw,match', [
    (dict(labels=[0, 11]), 'class labels'), (dict(labels=[]), 'non-empty'), (dict(cfg=-1.0), 'cfg'),
    (dict(top_k=-1), 'top_k'), (dict(top_k=2.5), 'top_k'), (dict(top_p=1.5), 'top_p'),
])
def test_bad_sampling_arguments(tiny_var, tiny_vqvae, kw, match):
    args = dict(labels=[0, 1], cfg=1.5, top_k=5, top_p=0.9) | kw
    labels = np.asarray(args.pop('labels'), np.int32)
    with pytest.raises(ValueError, match=match):
        sampling.sample(tiny_var, tiny_vqvae, labels, jax.random.key(0), **args)
