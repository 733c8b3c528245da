"""The built-in score (issue 6): the shapes10 judge, the Fréchet distance, `evaluate_workdir` on a
tiny random-weight model, and the CLI mode's handling of bad inputs.

The judge is trained once per session into a fresh cache directory (`VAR_JAX_CACHE`), so this
measures the real cold start: about a minute on 2 CPU cores, most of this file's runtime.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_VAR, TINY_VQ
from scipy import linalg

from var_jax import evaluate
from var_jax.data import builtin
from var_jax.eval import builtin_score, classifier
from var_jax.io import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = ('eval/classifier_test_acc', 'eval/guided_class_acc', 'eval/unguided_class_acc', 'eval/recon_class_acc',
        'eval/fd_guided', 'eval/fd_unguided', 'eval/fd_recon', 'eval/fd_train_vs_test', 'eval/fd_baseline_noise',
        'eval/fd_baseline_class_means')


@pytest.fixture(scope='session')
def judge(tmp_path_factory):
    """One judge per session, trained cold into a temporary cache (set for the whole session, so
    `evaluate_workdir` below finds it there instead of retraining)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('VAR_JAX_CACHE', str(tmp_path_factory.mktemp('judge_cache')))
        assert not classifier.cache_path(0).exists()
        yield classifier.get_judge(0)


# ---------------------------------------------------------------------------- the judge
def test_judge_accuracy_and_cache(judge):
    assert not judge.cached
    assert judge.test_acc >= 0.95, f'held-out accuracy {judge.test_acc:.3f}'
    print(f'judge: {judge.test_acc:.1%} on the test split, trained in {judge.train_seconds:.0f} s')
    images, labels = builtin.load('test')
    assert classifier.accuracy(judge) == judge.test_acc
    feats, logits = judge.outputs(images[:7])  # a ragged batch: padded inside, 7 rows out
    assert feats.shape == (7, classifier.CONFIG['width']) and logits.shape == (7, builtin.NUM_CLASSES)
    np.testing.assert_array_equal(judge.predict(images[:7]), logits.argmax(-1))
    np.testing.assert_allclose(judge.features(images[:7].astype(np.float32) / 255), feats, rtol=1e-5, atol=1e-5)

    reloaded = classifier.load(classifier.cache_path(0))
    assert reloaded.cached and reloaded.test_acc == judge.test_acc
    np.testing.assert_array_equal(reloaded.predict(images), judge.predict(images))


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'wrong shape'])
def test_unreadable_cache_is_trained_over(judge, damage, tmp_path, monkeypatch):
    monkeypatch.setenv('VAR_JAX_CACHE', str(tmp_path))
    path = classifier.cache_path(0)
    classifier.save(judge, path)
    if damage == 'garbage':
        path.write_bytes(b'not an npz')
    elif damage == 'truncated':
        path.write_bytes(path.read_bytes()[:1000])
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        key = next(k for k in arrays if k.startswith('param'))
        arrays[key] = arrays[key][..., :1]
        np.savez(path, **arrays)
    trained = []
    monkeypatch.setattr(classifier, 'train', lambda seed=0, **kw: trained.append(seed) or judge)
    with pytest.warns(UserWarning, match='unreadable judge cache'):
        assert classifier.get_judge(0, verbose=False) is judge
    assert trained == [0]
    assert classifier.load(path).test_acc == judge.test_acc  # rewritten whole


# ---------------------------------------------------------------------------- Fréchet distance
def _scipy_fd(a, b):
    """The textbook formula with scipy's sqrtm (ADM / pytorch-fid)."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) * 1.5 + 0.3
    assert builtin_score.frechet_distance(a, a) == pytest.approx(0, abs=1e-8 * np.trace(np.cov(a, rowvar=False)))
    assert builtin_score.frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-8)
    assert builtin_score.frechet_distance(a, b) == pytest.approx(builtin_score.frechet_distance(b, a), rel=1e-8)
    # fewer images than dimensions (singular covariances): still finite and non-negative
    few = builtin_score.frechet_distance(a[:5], b[:7])
    assert np.isfinite(few) and few > 0
    with pytest.raises(ValueError, match='two feature sets'):
        builtin_score.frechet_distance(a, b[:, :3])


def test_baselines_far_above_real_floor(judge):
    test, _ = builtin.load('test')
    ref = judge.features(test)
    train, train_labels = builtin_score._real('train', 1000, 32)
    floor = builtin_score.frechet_distance(judge.features(train), ref)
    for name, images in builtin_score._baselines(train, train_labels, 1000, 100, seed=0).items():
        fd = builtin_score.frechet_distance(judge.features(images), ref)
        assert fd > 20 * floor, (name, fd, floor)


# ---------------------------------------------------------------------------- workdirs
@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory, tiny_vqvae, tiny_var):
    """A random-weight model checkpoint (8px, conftest's tiny models) with the config.json a
    training workdir has: what `evaluate_workdir` reads to know the data and default cfg."""
    d = tmp_path_factory.mktemp('workdirs') / 'tiny'
    checkpoint.save_model(d, vqvae=tiny_vqvae, var=tiny_var)
    (d / 'config.json').write_text(json.dumps({'data': {'source': 'builtin'}, 'sample': {'cfg': 2.5}}))
    return d


@pytest.mark.slow
def test_evaluate_workdir(judge, tiny_workdir):
    out = builtin_score.evaluate_workdir(tiny_workdir, per_class=3, seed=1)
    assert tuple(out) == KEYS
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
    for k in KEYS:
        if k.endswith('_acc'):
            assert 0 <= out[k] <= 1, k  # random weights: near chance, but only a probability is certain
        else:
            assert out[k] >= 0, k
    assert out['eval/classifier_test_acc'] == judge.test_acc  # measured at the judge's own 32x32
    saved = json.loads((tiny_workdir / 'eval.json').read_text())
    assert {k: saved[k] for k in KEYS} == out
    assert saved['settings']['cfg'] == 2.5 and saved['settings']['samples'] == 30
    assert saved['settings']['judge']['cached'] is False  # the session's judge, trained in this process


@pytest.mark.slow
def test_cli_table(judge, tiny_workdir, capsys):
    # same per_class as above: same batch shape, so the sampler is not compiled again
    assert evaluate.main(['--workdir', str(tiny_workdir), '--per_class', '3', '--cfg', '1']) == 0
    out = capsys.readouterr().out
    assert 'class accuracy, guided samples' in out and 'baseline: per-pixel noise' in out
    assert f'written to {tiny_workdir}/eval.json' in out
    assert json.loads((tiny_workdir / 'eval.json').read_text())['settings']['cfg'] == 1.0


@pytest.mark.slow
def test_stored_score_only_for_the_same_settings_and_checkpoint(judge, tiny_workdir, tmp_path):
    saved = json.loads((tiny_workdir / 'eval.json').read_text())
    same = dict(per_class=3, cfg=1.0, top_k=0, top_p=0.0, seed=0)  # what test_cli_table measured
    assert builtin_score.stored_score(tiny_workdir, **same) == {k: saved[k] for k in KEYS}
    for change in ({'per_class': 4}, {'cfg': 2.0}, {'top_k': 5}, {'top_p': 0.9}, {'seed': 1}):
        assert builtin_score.stored_score(tiny_workdir, **{**same, **change}) is None, change
    # a checkpoint saved after the score makes it stale
    w = tmp_path / 'w'
    (w / 'checkpoints' / '10').mkdir(parents=True)
    (w / 'eval.json').write_text(json.dumps(saved))
    assert builtin_score.stored_score(w, **same) is not None
    (w / 'checkpoints' / '20').mkdir()
    os.utime(w / 'checkpoints' / '20', (time.time() + 5, time.time() + 5))
    assert builtin_score.stored_score(w, **same) is None
    (w / 'eval.json').write_text('{"eval/x": ')  # torn file: score again
    assert builtin_score.stored_score(w, **same) is None


def _json_workdir(root, name, *, var=True, config=None, class_names=None):
    """model.json (and config.json) only: all that the checks before JAX read."""
    d = root / name
    extra = {'class_names': list(class_names)} if class_names else {}
    checkpoint.write_model_json(d, vqvae=TINY_VQ, var=TINY_VAR if var else None, **extra)
    if config is not None:
        (d / 'config.json').write_text(json.dumps(config))
    return d


def test_check_workdir(tmp_path):
    ok = _json_workdir(tmp_path, 'named', class_names=builtin.CLASS_NAMES)
    assert builtin_score.check_workdir(ok) == {'cfg': builtin_score.DEFAULT_CFG}
    run = _json_workdir(tmp_path, 'run', config={'data': {'source': 'builtin'}, 'sample': {'cfg': 4}})
    assert builtin_score.check_workdir(run) == {'cfg': 4.0}
    with pytest.raises(ValueError, match='cannot tell what it was trained on'):
        builtin_score.check_workdir(_json_workdir(tmp_path, 'anonymous'))


CLI_CASES = {
    'missing workdir': (lambda d: [str(d / 'nope')], 'no such workdir'),
    'not a workdir': (lambda d: [str(d)], 'no model.json'),
    'tokenizer only': (lambda d: [str(_json_workdir(d, 'tok', var=False, config={'data': {'source': 'builtin'}}))],
                       'holds a tokenizer only'),
    # (a run on an image folder gets the folder score instead: tests/test_own_data.py)
    'other data': (lambda d: [str(_json_workdir(d, 'tfds', config={'data': {'source': 'tfds'}}))],
                   "trained on data.source='tfds'"),
    'bad per_class': (lambda d: [str(d), '--per_class', '0'], 'per_class must be an integer in [1, 1000]'),
    'negative cfg': (lambda d: [str(d), '--cfg', '-1'], 'cfg must be >= 0'),
    'infinite cfg': (lambda d: [str(d), '--cfg', 'inf'], 'cfg must be >= 0'),
    'bad top_p': (lambda d: [str(d), '--top_p', '1.5'], 'top_p must be in [0, 1] (0 = off)'),
    'both modes': (lambda d: [str(d), '--samples', 'x.npz'], 'not both'),
}


@pytest.mark.parametrize('case', list(CLI_CASES))
def test_cli_bad_inputs(case, tmp_path, capsys):
    make, expect = CLI_CASES[case]
    assert evaluate.main(['--workdir', *make(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ''
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and expect in lines[0], err


def test_cli_exit_code(tmp_path):
    """The real process: exit code 2 and one line, before JAX is imported (so quickly)."""
    code = 'import sys; from var_jax import evaluate; r = evaluate.main(sys.argv[1:]); ' \
           "assert 'jax' not in sys.modules, 'imported JAX'; sys.exit(r)"
    r = subprocess.run([sys.executable, '-c', code, '--workdir', str(tmp_path / 'nope')], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f'error: {tmp_path / "nope"}: no such workdir'
