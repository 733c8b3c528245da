"""Sampler behaviour: official top-k/top-p semantics, seeding, no recompilation, bad arguments."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_VAR

from var_jax.sampling import batch, generate
from var_jax.sampling.generate import filter_logits
from var_jax.sampling.settings import EDIT_DEMO, Settings, check_labels, check_settings, resolve_settings


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


def test_top_of_the_sort_keeps_the_stable_tie_order():
    logits = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    logits[0, [3, 9, 40, 41]] = 5.0  # tied maximum: the stable ascending sort puts 3 first, 41 last
    logits[1, 20:30] = np.sort(logits[1])[-12]  # a tie group straddling the 24th largest
    srt, order = generate._sorted_top(jnp.asarray(logits), *jax.lax.top_k(jnp.asarray(logits)[:, ::-1], 24))
    srt_ref, order_ref = generate._sorted_full(jnp.asarray(logits))
    np.testing.assert_array_equal(srt[:, -24:], srt_ref[:, -24:])
    np.testing.assert_array_equal(order[:, -24:], order_ref[:, -24:])
    assert np.asarray(order)[0, -4:].tolist() == [3, 9, 40, 41]
    assert np.isneginf(np.asarray(srt)[:, :-24]).all()


def test_filter_edge_cases():
    logits = np.array([[1.0, 3.0, 3.0, 2.0, -5.0]], np.float32)
    assert kept(logits, 1, 0.0).tolist() == [[False, True, True, False, False]], 'top-k keeps ties'
    assert kept(logits, 0, 1e-9).sum() == 1 and kept(logits, 0, 1e-9)[0, 1:3].any(), 'top-p keeps the max'
    assert kept(logits, 0, 0.0).all() and kept(logits, 0, 1.0).all(), 'top_p 0 and 1 keep everything'
    assert kept(logits, 99, 0.0).all(), 'top_k above V keeps everything'


def test_top_k_limits_the_support():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 400)
    toks = jax.vmap(lambda k: generate.sample_tokens(k, logits, 2, 0.0)[0])(keys)
    assert set(np.unique(toks)) == set(np.argsort(np.asarray(logits[0]))[-2:])


def test_sample_shapes_seeds_and_no_recompile(tiny_var, tiny_vqvae):
    labels = np.array([3, 7, 3])
    img, idx = generate.sample(tiny_var, tiny_vqvae, labels, jax.random.key(0), cfg=1.5, top_k=10, top_p=0.9)
    assert img.shape == (3, 8, 8, 3) and img.dtype == jnp.float32
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert [i.shape for i in idx] == [(3, p * p) for p in TINY_VAR.patch_nums]
    traces = generate.TRACE_COUNT['generate']
    img2, idx2 = generate.sample(tiny_var, tiny_vqvae, labels, jax.random.key(0), cfg=1.5, top_k=10, top_p=0.9)
    np.testing.assert_array_equal(img, img2)
    generate.sample(tiny_var, tiny_vqvae, labels, jax.random.key(1), cfg=3.0, top_k=0, top_p=0.0)
    assert generate.TRACE_COUNT['generate'] == traces, 'same shapes must not retrace'
    img3, _ = generate.sample(tiny_var, tiny_vqvae, labels, jax.random.key(5), cfg=1.5, top_k=10, top_p=0.9)
    assert not np.array_equal(img, img3)


@pytest.mark.slow
def test_cfg_zero_skips_the_null_class_rows_without_changing_samples(tiny_var, tiny_vqvae):
    labels = np.array([1, 4, 9])
    img, idx, logits = generate.sample(tiny_var, tiny_vqvae, labels, jax.random.key(2), cfg=0.0, top_k=5,
                                       top_p=0.0, return_logits=True)
    # the doubled-batch program with a (traced) guidance of 0: the same logits and tokens
    keys = generate.row_keys(jax.random.key(2), 3)
    img2, idx2, _, logits2 = generate._sample_jit(tiny_var, tiny_vqvae, jnp.asarray(labels, jnp.int32), keys,
                                                  jnp.float32(0), jnp.int32(5), jnp.float32(0), return_logits=True)
    np.testing.assert_allclose(logits, logits2, atol=1e-5)
    for a, b in zip(idx, idx2):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(img, img2, atol=1e-6)


@pytest.mark.slow
def test_rows_do_not_depend_on_the_batch(tiny_var, tiny_vqvae):
    keys = jax.random.split(jax.random.key(0), 4)
    _, a = generate.sample(tiny_var, tiny_vqvae, np.array([1, 2, 3, 4]), keys, cfg=2.0, top_k=0, top_p=0.0)
    _, b = generate.sample(tiny_var, tiny_vqvae, np.array([3, 1]), keys[jnp.array([2, 0])], cfg=2.0, top_k=0,
                           top_p=0.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x)[[2, 0]], y)


@pytest.mark.slow
def test_more_smooth(tiny_var, tiny_vqvae):
    img, idx = generate.sample(tiny_var, tiny_vqvae, np.array([0, 1]), jax.random.key(0), cfg=1.0, top_k=5,
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
        generate.sample(tiny_var, tiny_vqvae, labels, jax.random.key(0), **args)


# Exact tokens of the tiny model (seed 1; tokenizer seed 0) for labels [3, 7] and key(11), recorded
# with the sampler before its filtering was reworked: any change to what is drawn shows up here.
PINNED = {
    (1.5, 20, 0.8, False): [
        [60, 15, 55, 55, 55, 39, 14, 23, 38, 11, 47, 5, 26, 12, 5, 18, 37, 49, 25, 9, 55, 18, 59, 23, 60, 47, 5, 19,
         39, 30],
        [7, 46, 6, 4, 47, 47, 37, 28, 5, 47, 19, 0, 34, 59, 60, 5, 37, 43, 5, 26, 6, 52, 25, 36, 29, 39, 19, 29, 37,
         58]],
    (0.0, 0, 0.96, False): [
        [29, 49, 36, 1, 58, 7, 29, 60, 60, 50, 40, 42, 17, 42, 35, 22, 37, 49, 52, 14, 19, 51, 18, 23, 30, 54, 55,
         19, 26, 17],
        [7, 14, 9, 4, 33, 8, 37, 16, 42, 29, 57, 46, 34, 59, 60, 50, 15, 12, 8, 26, 6, 32, 25, 36, 37, 30, 9, 22, 32,
         29]],
    (3.0, 900, 0.0, False): [
        [29, 12, 36, 1, 58, 63, 9, 60, 60, 50, 40, 42, 17, 42, 57, 38, 37, 49, 62, 41, 8, 51, 60, 55, 50, 20, 61, 9,
         20, 33],
        [7, 60, 37, 4, 33, 0, 37, 32, 42, 30, 44, 42, 34, 59, 60, 50, 59, 52, 8, 18, 6, 7, 25, 36, 61, 20, 18, 44, 32,
         5]],
    (1.5, 5, 0.9, True): [
        [60, 8, 55, 55, 55, 28, 17, 28, 45, 11, 49, 28, 47, 12, 5, 18, 37, 18, 26, 46, 58, 18, 19, 18, 36, 18, 23,
         18, 18, 35],
        [7, 25, 55, 46, 5, 28, 13, 19, 45, 47, 43, 47, 47, 11, 60, 11, 37, 36, 26, 26, 49, 18, 19, 36, 0, 19, 46, 36,
         36, 36]],
}


@pytest.fixture
def small_capacity(monkeypatch):
    """filter_logits' top_k path with the tiny vocabulary (64): capacity 24 < V. The capacity is
    read while tracing, so jit caches are cleared before and after."""
    jax.clear_caches()
    monkeypatch.setattr(generate, 'TOP_K_CAPACITY', 24)
    yield 24
    jax.clear_caches()


@pytest.mark.parametrize('setting', sorted(PINNED))
def test_pinned_tokens(tiny_var, tiny_vqvae, setting):
    cfg, top_k, top_p, more_smooth = setting
    _, idx = generate.sample(tiny_var, tiny_vqvae, np.array([3, 7]), jax.random.key(11), cfg=cfg, top_k=top_k,
                             top_p=top_p, more_smooth=more_smooth)
    assert np.concatenate([np.asarray(i) for i in idx], 1).tolist() == PINNED[setting]


@pytest.mark.parametrize('setting', [(1.5, 20, 0.8, False), (1.5, 5, 0.9, True)])
@pytest.mark.slow
def test_pinned_tokens_through_the_top_k_path(tiny_var, tiny_vqvae, setting, small_capacity):
    """top_k <= capacity: lax.top_k instead of the full sort, the same tokens."""
    test_pinned_tokens(tiny_var, tiny_vqvae, setting)


@pytest.mark.parametrize('top_k,top_p', [(1, 0.0), (5, 0.0), (7, 0.9), (24, 0.5), (25, 0.5), (0, 0.96), (64, 0.3)])
def test_top_k_path_equals_the_full_sort(top_k, top_p, small_capacity):
    """Bit-identical filtered logits, and the same tokens at every kept position, with or without
    the full sort (top_k above the capacity, 0, or ties past it fall back to the sort)."""
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(3, 5, 64)).astype(np.float32) * 2
    logits[0, 0, :30] = logits[0, 0, 0]  # a tie group larger than the capacity
    logits[1, 0, 10:14] = logits[1, 0].max()  # ties at the top
    srt, order = filter_logits(jnp.asarray(logits), top_k, top_p)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(generate, 'TOP_K_CAPACITY', 4096)
        srt_ref, order_ref = filter_logits(jnp.asarray(logits), top_k, top_p)
    np.testing.assert_array_equal(srt, srt_ref)
    finite = np.isfinite(np.asarray(srt_ref))
    np.testing.assert_array_equal(np.asarray(order)[finite], np.asarray(order_ref)[finite])
    assert (np.sort(np.asarray(order), -1) == np.arange(64)).all(), 'order stays a permutation'
    want = np.isfinite(official_filter(logits, min(top_k, 64), top_p))
    np.testing.assert_array_equal(kept(logits, top_k, top_p), want)


# ---------------------------------------------------------------------------- one check, one sampler
def test_one_settings_check_and_one_label_check():
    """Flags and library arguments go through one check with one convention (0 = off); class
    indices through one range check (the null class only where unconditional rows are allowed)."""
    assert check_settings(0, 0, 0) == Settings(0.0, 0, 0.0, False)
    with pytest.raises(ValueError, match=r'^--top_k must be a non-negative integer \(0 = off\), got 2.5'):
        check_settings(1.5, 2.5, 0.5)
    with pytest.raises(ValueError, match=r'^top_p must be in \[0, 1\] \(0 = off\), got 1.5'):
        check_settings(1.5, 0, 1.5, prefix='')
    for cfg in (-1.0, float('inf'), float('nan')):
        with pytest.raises(ValueError, match='^--cfg must be >= 0'):
            check_settings(cfg, 0, 0.0)
    args = argparse.Namespace(cfg=None, top_k=5, top_p=None, more_smooth=None)
    assert resolve_settings(args, EDIT_DEMO) == Settings(3.0, 5, 0.95, True), 'a flag beats the defaults'

    check_labels([0, 9], 10)
    check_labels(10, 10, null_ok=True)
    with pytest.raises(ValueError, match=r'^unknown class 10: this model has classes 0..9$'):
        check_labels([3, 10, 11], 10)
    with pytest.raises(ValueError, match='unknown class -1: .* 10, the null class'):
        check_labels(np.array([-1, 10]), 10, null_ok=True)


def test_batch_sampler_pads_the_last_batch(tiny_var, tiny_vqvae, monkeypatch):
    """5 images in batches of 2: every call has the compiled size (the tail padded), the padding is
    cut off again, and the images are those of keys image_keys(seed, class, index) in one batch."""
    labels, index = np.array([1, 1, 4, 4, 9]), np.array([0, 1, 0, 1, 0])
    s = check_settings(2.0, 5, 0.0)
    ref, _ = generate.sample(tiny_var, tiny_vqvae, labels, generate.image_keys(3, labels, index), s.cfg, s.top_k,
                             s.top_p)
    shapes, real = [], generate.sample
    monkeypatch.setattr(generate, 'sample', lambda var, vq, lab, *a, **kw: shapes.append(lab.shape) or real(
        var, vq, lab, *a, **kw))
    out = list(batch.Sampler(tiny_var, tiny_vqvae, s, 3, batch_size=2).run(labels, index))
    assert shapes == [(2,)] * 3
    assert [start for start, _, _ in out] == [0, 2, 4] and [len(im) for _, im, _ in out] == [2, 2, 1]
    images = np.concatenate([im for _, im, _ in out])
    assert images.dtype == np.float32
    np.testing.assert_allclose(images, ref, atol=1e-5)  # another batch size: the last float bits may differ
    u8 = batch.Sampler(tiny_var, tiny_vqvae, s, 3, batch_size=2, uint8=True).sample(labels, index)
    assert u8.dtype == np.uint8 and np.abs(u8 - np.round(255 * images)).max() <= 1  # rounded on the devices
