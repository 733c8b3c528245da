"""Numerical parity with the official PyTorch implementation (../shared/fixtures).

Each fixture holds weights in official key names and the official code's outputs; tolerances
are the fixture's `suggested_atol_for_fp32_port` (10x the official fp32-vs-fp64 deviation).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from var_jax.io.checkpoint import merge_params
from var_jax.models.var import scale_bounds
from var_jax.sampling import generate

CFGS = (0.0, 1.5, 4.0)


def _cat(idx_list):
    return np.concatenate([np.asarray(i) for i in idx_list], axis=1)


def _close(got, want, atol, what):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert err <= atol, f'{what}: max |diff| {err:.3g} > atol {atol:.3g}'


def test_tokenizer(official):
    e, vq = official.expected, official.vqvae
    _close(nnx.jit(lambda m, x: m.encode(x))(vq, e['images']), e['f'], official.atol['f'], 'f')
    idx = vq.img_to_idx(e['images'])
    assert [i.shape for i in idx] == [(2, p * p) for p in e['patch_nums']]
    assert all(i.dtype == np.int32 for i in idx)
    np.testing.assert_array_equal(_cat(idx), e['idx_list'])
    _close(vq.img_to_fhat(e['images']), e['f_hat'], official.atol['f_hat'], 'f_hat')
    _close(vq.idx_to_var_input(idx), e['var_input'], official.atol['var_input'], 'var_input')
    _close(vq.idx_to_img(idx), e['recon'], official.atol['recon'], 'recon')


def test_teacher_forced_logits(official):
    e = official.expected
    logits = np.asarray(official.var(e['labels'], e['var_input']))
    assert logits.shape == e['logits'].shape and logits.dtype == np.float32
    _close(logits, e['logits'], official.atol['logits'], 'logits')
    lse = np.log(np.sum(np.exp(logits.astype(np.float64)), -1))
    _close(lse, e['logits_logsumexp'], official.atol['logits_logsumexp'], 'logsumexp')
    sure = e['logits_margin'] > 10 * official.atol['logits']  # argmax is only defined away from ties
    np.testing.assert_array_equal(logits.argmax(-1)[sure], e['logits_argmax'][sure])


@pytest.mark.parametrize('attention', ['jax', 'blockwise'])
def test_teacher_forced_logits_every_attention(official, attention):
    """The CPU-capable attention implementations other than the default 'xla' (tested above) on
    the same weights and inputs ('cudnn' and 'splash': `models.var.check_attention` on a device)."""
    e, var = official.expected, official.var
    other = merge_params(var.config.replace(attention=attention), nnx.state(var, nnx.Param))
    logits = np.asarray(other(e['labels'], e['var_input']))
    _close(logits, e['logits'], official.atol['logits'], f'logits with attention={attention!r}')


@pytest.mark.parametrize('cfg', CFGS)
@pytest.mark.slow
def test_greedy_guided_sampling(official, cfg):
    e = official.expected
    images, idx, logits = generate.sample(official.var, official.vqvae, e['labels'], jax.random.key(0), cfg=cfg,
                                          top_k=1, top_p=0.0, return_logits=True)
    np.testing.assert_array_equal(_cat(idx), e[f'greedy_cfg{cfg}_idx'])
    _close(images, e[f'greedy_cfg{cfg}_img'], official.atol[f'greedy_cfg{cfg}_img'], 'image')
    top2 = np.sort(np.asarray(logits), -1)[..., -2:]
    _close(top2[..., 1] - top2[..., 0], e[f'greedy_cfg{cfg}_margin'],
           2 * official.atol[f'greedy_cfg{cfg}_guided_logits'], 'guided top-1 margin')


def test_sampler_logits_equal_teacher_forced(official):
    """KV-cached guided logits == CFG mix of teacher-forced cond/uncond logits on the same tokens."""
    e, var, vq = official.expected, official.var, official.vqvae
    cfg = 1.5
    _, idx, logits = generate.sample(var, vq, e['labels'], jax.random.key(0), cfg=cfg, top_k=1, top_p=0.0,
                                     return_logits=True)
    var_input = vq.idx_to_var_input(idx)
    cond = np.asarray(var(e['labels'], var_input))
    uncond = np.asarray(var(np.full_like(e['labels'], var.config.num_classes), var_input))
    sn = len(var.config.patch_nums)
    want = np.empty_like(cond)
    for si, (b, end) in enumerate(scale_bounds(var.config.patch_nums)):
        t = cfg * si / (sn - 1)
        want[:, b:end] = (1 + t) * cond[:, b:end] - t * uncond[:, b:end]
    _close(logits, want, official.atol['greedy_cfg1.5_guided_logits'], 'cached vs teacher-forced logits')
