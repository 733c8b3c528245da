"""The optimizer against the official recipe (issue 19.9): the weight-decay groups of
`utils/lr_control.py filter_params` on the real parameter names (d16 and shared AdaLN), and the
learning-rate / weight-decay schedules of `lr_wd_annealing`.

The official rules are re-stated here (not imported: the official code is not a dependency):
    no decay  <=>  ndim == 1  or  name.endswith('bias')  or  any(k in name for k in nowd_keys)
with `nowd_keys` from the official train.py, and the names and shapes of the official
`VAR.named_parameters()` (buffers such as lvl_1L, attn_bias_for_masking, zero_k_bias excluded).
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx

from var_jax.io import official
from var_jax.models import VARConfig, abstract
from var_jax.training import optim

OFFICIAL_NOWD_KEYS = {'cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                      'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul'}


def official_no_decay(name: str, shape) -> bool:
    return len(shape) == 1 or name.endswith('bias') or any(k in name for k in OFFICIAL_NOWD_KEYS)


def official_var_params(cfg: VARConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official VAR's trainable parameters (models/var.py, basic_var.py)."""
    c, h, d = cfg.C, cfg.H, cfg.depth
    hidden = round(c * cfg.mlp_ratio)
    out = {'pos_start': (1, 1, c), 'pos_1LC': (1, cfg.L, c), 'word_embed.weight': (c, cfg.cvae),
           'word_embed.bias': (c,), 'class_emb.weight': (cfg.num_classes + 1, c),
           'lvl_embed.weight': (len(cfg.patch_nums), c)}
    if cfg.shared_aln:
        out.update({'shared_ada_lin.1.weight': (6 * c, c), 'shared_ada_lin.1.bias': (6 * c,)})
    for i in range(d):
        b = f'blocks.{i}.'
        if cfg.shared_aln:
            out[b + 'ada_gss'] = (1, 1, 6, c)
        else:
            out.update({b + 'ada_lin.1.weight': (6 * c, c), b + 'ada_lin.1.bias': (6 * c,)})
        out.update({b + 'attn.scale_mul_1H11': (1, h, 1, 1), b + 'attn.q_bias': (c,), b + 'attn.v_bias': (c,),
                    b + 'attn.mat_qkv.weight': (3 * c, c), b + 'attn.proj.weight': (c, c), b + 'attn.proj.bias': (c,),
                    b + 'ffn.fc1.weight': (hidden, c), b + 'ffn.fc1.bias': (hidden,),
                    b + 'ffn.fc2.weight': (c, hidden), b + 'ffn.fc2.bias': (c,)})
    out.update({'head_nm.ada_lin.1.weight': (2 * c, c), 'head_nm.ada_lin.1.bias': (2 * c,),
                'head.weight': (cfg.vocab_size, c), 'head.bias': (cfg.vocab_size,)})
    return out


D16 = VARConfig(depth=16, num_classes=1000, vocab_size=4096, cvae=32)
D16_SALN = VARConfig(depth=16, num_classes=1000, vocab_size=4096, cvae=32, shared_aln=True)


def our_mask(cfg: VARConfig) -> dict[tuple, bool]:
    """decay_mask as train.py calls it ({'var': abstract parameter state}), flattened by path."""
    params = {'var': nnx.state(abstract(cfg), nnx.Param)}
    mask = optim.decay_mask(params)
    names = lambda p: tuple(k.key for k in p if isinstance(k, jax.tree_util.DictKey))  # noqa: E731
    return {names(p): bool(m) for p, m in jax.tree_util.tree_leaves_with_path(mask)}


@pytest.mark.parametrize('cfg', [D16, D16_SALN], ids=['d16', 'd16-shared-aln'])
def test_decay_mask_is_the_official_rule(cfg):
    mask = our_mask(cfg)
    expected: dict[tuple, bool] = {}
    for name, shape in official_var_params(cfg).items():
        path = official._var_rule(name)[0]
        decay = not official_no_decay(name, shape)
        assert expected.setdefault(('var',) + path, decay) == decay, f'{name}: blocks differ'
    assert sorted(mask) == sorted(expected), 'every parameter is covered, nothing else'
    wrong = {'.'.join(p[1:]): mask[p] for p in mask if mask[p] != expected[p]}
    assert not wrong, f'decay differs from the official groups (ours shown): {wrong}'
    # the examples, spelled out
    for p in (('blocks', 'attn', 'proj', 'bias'), ('blocks', 'attn', 'q_bias'), ('blocks', 'ffn', 'fc1', 'bias'),
              ('head', 'bias'), ('pos_1LC',), ('lvl_embed', 'embedding'), ('blocks', 'attn', 'scale_mul')):
        assert mask[('var',) + p] is False, p
    for p in (('blocks', 'attn', 'mat_qkv'), ('blocks', 'ffn', 'fc2', 'kernel'), ('class_emb', 'embedding'),
              ('head', 'kernel'), ('word_embed', 'kernel')):
        assert mask[('var',) + p] is True, p
    if cfg.shared_aln:
        assert mask[('var', 'blocks', 'ada_gss')] is False and mask[('var', 'shared_ada_lin', 'kernel')] is True
    else:
        assert mask[('var', 'blocks', 'ada_lin', 'bias')] is False and mask[('var', 'blocks', 'ada_lin', 'kernel')]


@pytest.mark.parametrize('name', ['var_tiny', 'var_tiny_saln'])
def test_official_parameter_list_matches_a_real_state_dict(name):
    """The restated official names and shapes above are those of a real official checkpoint."""
    f = FIXTURES / name / 'var_state.npz'
    if not f.exists():
        pytest.skip(f'parity fixtures not found at {f.parent}')
    sd = dict(np.load(f))
    cfg = official.var_config_from_state(sd)
    params = {k: v.shape for k, v in sd.items() if not official.VAR_BUFFERS.match(k)}
    assert params == official_var_params(cfg)


def test_decay_mask_on_unstacked_params():
    """Outside `blocks` there is no depth axis: a (C,) vector is 1-D, a (C, C) matrix is decayed."""
    params = {'disc': {'conv': {'kernel': np.zeros((3, 3, 4, 8)), 'bias': np.zeros(8)},
                       'norm': {'scale': np.zeros(8)}}}
    m = optim.decay_mask(params)
    assert m == {'disc': {'conv': {'kernel': True, 'bias': False}, 'norm': {'scale': False}}}


# ---------------------------------------------------------------------------- schedules
def official_lr(sche, peak, it, wp_it, max_it, wp0, wpe):
    """`lr_wd_annealing`'s learning rate, re-stated."""
    wp_it = round(wp_it)
    if it < wp_it:
        f = wp0 + (1 - wp0) * it / wp_it
    else:
        pasd = (it - wp_it) / (max_it - 1 - wp_it)
        if sche == 'cos':
            f = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
        elif sche == 'lin0':
            f = 1 if pasd < 0.05 else wpe + (1 - wpe) * (1 - pasd) / 0.95
        else:  # 'const': not in the official list; peak after the same warm-up
            f = 1
    return f * peak


def official_wd(wd, wd_end, it, max_it):
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))


@pytest.mark.parametrize('sche', ['lin0', 'cos', 'const'])
def test_lr_schedule_matches_the_official_formula(sche):
    peak, max_it, wp_it, wp0, wpe = 3e-4, 1000, 40.4, 0.005, 0.1
    fn = optim.lr_schedule(peak, max_it, wp_it, wp0=wp0, wpe=wpe, kind=sche)
    wp = round(wp_it)
    its = [0, 1, wp // 2, wp - 1, wp, wp + 1, wp + 47, wp + 48, 500, max_it - 2, max_it - 1]
    for it in its:
        want = official_lr(sche, peak, it, wp_it, max_it, wp0, wpe)
        assert float(fn(it)) == pytest.approx(want, rel=1e-5), (sche, it)
    assert float(fn(0)) == pytest.approx(wp0 * peak)  # warm-up starts at wp0 * peak
    assert float(fn(wp)) == pytest.approx(peak)  # and ends at the peak
    end = {'lin0': wpe * peak, 'cos': wpe * peak, 'const': peak}[sche]
    assert float(fn(max_it - 1)) == pytest.approx(end, rel=1e-5)
    if sche == 'lin0':  # the plateau: peak for the first 5 % after warm-up
        assert float(fn(wp + 0.04 * (max_it - 1 - wp))) == pytest.approx(peak)


def test_wd_schedule_is_the_official_cosine():
    fn = optim.wd_schedule(0.05, 0.08, 1000)
    for it in (0, 1, 250, 499, 500, 998, 999):
        assert float(fn(it)) == pytest.approx(official_wd(0.05, 0.08, it, 1000), rel=1e-6), it
    assert float(fn(0)) == pytest.approx(0.05) and float(fn(999)) == pytest.approx(0.08)


def test_optimizer_does_not_decay_biases():
    """One AdamW step with zero gradients moves only decayed parameters (by lr * wd * p)."""
    params = {'var': {'blocks': {'attn': {'proj': {'kernel': np.ones((2, 4, 4), np.float32),
                                                   'bias': np.ones((2, 4), np.float32)}}},
                      'head': {'kernel': np.ones((4, 3), np.float32), 'bias': np.ones((3,), np.float32)}}}
    tx = optim.make_optimizer(peak_lr=0.1, max_it=10, wp_it=0, wd=0.5, wd_end=0.5, clip=0.0,
                              mask=optim.decay_mask)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), state, params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert moved == {'var': {'blocks': {'attn': {'proj': {'kernel': True, 'bias': False}}},
                             'head': {'kernel': True, 'bias': False}}}


def test_lr_schedule_edges():
    with pytest.raises(ValueError, match="lr schedule must be 'lin0', 'cos' or 'const', got 'linear'"):
        optim.lr_schedule(1e-3, 100, 10, kind='linear')
    no_warmup = optim.lr_schedule(1e-3, 100, 0, wpe=0.1, kind='cos')  # wp_it 0: the peak from the first step
    assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(99)) == pytest.approx(1e-4, rel=1e-5)
    one_step = optim.lr_schedule(1e-3, 1, 0, kind='lin0')  # max_it - 1 - wp_it = 0: no division by zero
    assert float(one_step(0)) == pytest.approx(1e-3)
    assert float(optim.wd_schedule(0.05, 0.08, 1)(0)) == pytest.approx(0.05)


def test_decay_mask_names_list_items_by_index():
    m = optim.decay_mask({'layers': [{'kernel': np.zeros((4, 4)), 'scale': np.zeros(4)}],
                          'pos_start': np.zeros((1, 2, 4))})
    assert m == {'layers': [{'kernel': True, 'scale': False}], 'pos_start': False}


@pytest.mark.parametrize('wd_end', [0.08, None])
def test_optimizer_follows_the_schedules_step_by_step(wd_end):
    """The lr / wd the optimizer reports (and applies: AdamW's decoupled decay -lr * wd * p with zero
    gradients) at each step are the schedules' values there; wd_end None keeps wd constant."""
    peak, max_it, wp_it, wd = 0.1, 8, 2, 0.5
    tx = optim.make_optimizer(peak_lr=peak, max_it=max_it, wp_it=wp_it, wd=wd, wd_end=wd_end, clip=2.0, wpe=0.1,
                              sched='cos', mask=optim.decay_mask)
    lr = optim.lr_schedule(peak, max_it, wp_it, wpe=0.1, kind='cos')
    wdf = optim.wd_schedule(wd, wd if wd_end is None else wd_end, max_it)
    params = {'w': np.ones((2, 2), np.float32), 'bias': np.ones(2, np.float32)}
    state = tx.init(params)
    for it in range(max_it):
        updates, state = tx.update(jax.tree.map(np.zeros_like, params), state, params)
        hp = optim.current_hparams(state)
        assert float(hp['lr']) == pytest.approx(float(lr(it)), rel=1e-6), it
        assert float(hp['wd']) == pytest.approx(float(wdf(it)) if wd_end else wd, rel=1e-6), it
        np.testing.assert_allclose(updates['w'], -float(lr(it)) * float(wdf(it)) * params['w'], rtol=1e-5)
        np.testing.assert_array_equal(updates['bias'], 0)
