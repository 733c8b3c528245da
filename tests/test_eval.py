"""ADM-protocol evaluation: Inception parity with pytorch-fid (random weights), the metrics on
constructed inputs, the torch-free legacy .pth reader, and the CLI's handling of bad inputs.

The reference outputs in data/inception_ref.npz come from data/make_inception_ref.py (pytorch-fid
with torch); the weights are regenerated here from the same numpy code, so no torch is needed.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from var_jax import evaluate
from var_jax.eval import adm, inception, inputs
from var_jax.io import state_dict_legacy as legacy_torch
from var_jax.io.state_dict import load_state_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parent / 'data'


def _ref_module():
    spec = importlib.util.spec_from_file_location('make_inception_ref', DATA / 'make_inception_ref.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # numpy only at import; torch is imported inside main()
    return mod


MIR = _ref_module()


@pytest.fixture(scope='module')
def ref():
    with np.load(DATA / 'inception_ref.npz') as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def torch_spec(ref):
    return {k: tuple(s) for k, s in json.loads(str(ref['state_keys'])).items()}


@pytest.fixture(scope='module')
def extractor(torch_spec, tmp_path_factory):
    """The random-weight model, loaded from a file through the real weights' loading path."""
    path = tmp_path_factory.mktemp('inception') / 'random_inception.npz'
    np.savez(path, **MIR.random_state_dict(torch_spec))
    model = inception.load_inception(path)
    path.unlink()
    return adm.FeatureExtractor(model, batch_size=8)  # 8 fake CPU devices (conftest): one image each


# ---------------------------------------------------------------------------- Inception parity
def test_state_dict_keys_match_pytorch_fid(torch_spec):
    ours = inception.state_dict_spec()
    theirs = {k: s for k, s in torch_spec.items() if not k.endswith('num_batches_tracked')}
    assert set(ours) == set(theirs)
    assert all(ours[k] == theirs[k] for k in ours)


def test_inception_matches_pytorch_fid(extractor, ref):
    """uint8 images -> TF1 resize -> (x-128)/128 -> FID InceptionV3, against torch to fp32 rounding."""
    out = extractor(MIR.test_images())
    n = len(ref['pool'])
    np.testing.assert_allclose(out['pool'], ref['pool'], rtol=0, atol=5e-5)
    np.testing.assert_allclose(out['spatial'], ref['spatial'].reshape(n, -1), rtol=0, atol=5e-5)
    np.testing.assert_allclose(out['logits'], ref['logits'], rtol=0, atol=5e-5)
    assert out['pool'].shape == (n, 2048) and out['spatial'].shape == (n, 17 * 17 * 7)
    assert out['logits'].shape == (n, 1008)


def test_extract_streams_npz_in_order(extractor, ref, tmp_path):
    """9 images read from an npz in two batches of 8 (the tail padded) keep their order."""
    imgs = MIR.test_images()[np.arange(9) % 2]
    np.savez(tmp_path / 's.npz', arr_0=imgs)
    got = extractor.extract(inputs.NpzImages(tmp_path / 's.npz'), 'test')
    assert {k: v.shape[0] for k, v in got.items()} == {'pool': 9, 'spatial': 9, 'logits': 9}
    np.testing.assert_allclose(got['pool'], ref['pool'][np.arange(9) % 2], rtol=0, atol=5e-5)
    np.testing.assert_allclose(got['logits'], ref['logits'][np.arange(9) % 2], rtol=0, atol=5e-5)


def test_tf1_resize_matrix():
    # TF1 legacy bilinear maps output i to input i * in/out (no half-pixel offset) and clamps.
    np.testing.assert_allclose(inception.tf1_bilinear_matrix(2, 4),
                               [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    np.testing.assert_allclose(inception.tf1_bilinear_matrix(5, 5), np.eye(5))
    m = inception.tf1_bilinear_matrix(256, 299)
    np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)
    src = np.arange(299, dtype=np.float32) * np.float32(256 / 299)
    lo = np.floor(src).astype(int)
    np.testing.assert_allclose(m[np.arange(299), lo], np.where(lo == 255, 1, 1 - (src - lo)), atol=1e-6)
    d = inception.tf1_bilinear_matrix(512, 299)  # downscale: two taps, no antialias
    assert (np.count_nonzero(d, axis=1) <= 2).all()


# ---------------------------------------------------------------------------- weights files
def test_legacy_torch_reader(ref, tmp_path):
    path = tmp_path / 'legacy.pth'
    path.write_bytes(ref['legacy_pth'].tobytes())
    assert legacy_torch.is_legacy_torch_file(path)
    sd = legacy_torch.load_legacy_state_dict(path)
    expected = {k.split('/', 1)[1]: v for k, v in ref.items() if k.startswith('legacy/')}
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        np.testing.assert_array_equal(sd[k], v)
    generic = load_state_dict(path)  # the converter's reader takes the same file
    assert all(np.array_equal(generic[k], sd[k]) for k in sd)
    np.savez(tmp_path / 'x.npz', a=np.ones(2))
    assert not legacy_torch.is_legacy_torch_file(tmp_path / 'x.npz')
    (tmp_path / 'bad.pth').write_bytes(ref['legacy_pth'].tobytes()[:-10])
    with pytest.raises(ValueError, match='truncated'):
        legacy_torch.load_legacy_state_dict(tmp_path / 'bad.pth')


def _zeros_state(torch_spec):
    # read-only zero views: no memory, and the checks fail before any value is used
    return {k: np.broadcast_to(np.float32(0), s) for k, s in torch_spec.items()}


def test_inception_weight_errors(torch_spec, tmp_path):
    with pytest.raises(ValueError, match='github.com/mseitzer/pytorch-fid/releases'):
        inception.load_inception(tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
    sd = _zeros_state(torch_spec)
    sd['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ValueError, match="unexpected key 'AuxLogits.fc.weight'"):
        inception.inception_from_state(sd)
    sd = _zeros_state(torch_spec)
    del sd['Mixed_6d.branch1x1.bn.running_var']
    with pytest.raises(ValueError, match="missing key 'Mixed_6d.branch1x1.bn.running_var'"):
        inception.inception_from_state(sd)
    sd = _zeros_state(torch_spec)
    sd['fc.weight'] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError, match=r"key 'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"):
        inception.inception_from_state(sd)


# ---------------------------------------------------------------------------- metrics
def _fid_direct(a, b):
    """Independent FID: tr sqrt(S1 S2) as the sum of sqrt of the (real, >= 0) eigenvalues of S1 S2."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_fid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 48))
    b = rng.normal(size=(500, 48)) * 1.3 + 0.2 + a[:500] * 0.5
    sa, sb = adm.statistics(a), adm.statistics(b)
    assert abs(adm.frechet_distance(sa, sa)) < 1e-6
    np.testing.assert_allclose(adm.frechet_distance(sa, sb), _fid_direct(a, b), rtol=1e-8)
    np.testing.assert_allclose(adm.frechet_distance(sb, sa), _fid_direct(a, b), rtol=1e-8)
    shifted = adm.statistics(a + 1.0)  # a pure mean shift of 1 in every dimension: FID = d
    np.testing.assert_allclose(adm.frechet_distance(sa, shifted), 48.0, rtol=1e-6)


def test_inception_score():
    assert adm.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    confident = 60.0 * np.eye(1008)[np.arange(1000) % 10]  # 10 classes, equally often, p(y|x) ~ one-hot
    assert adm.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # ADM averages over consecutive splits of 5000: two single-class halves score 1 each, not 2
    two = 60.0 * np.eye(1008)[np.repeat([0, 1], 5000)]
    assert adm.inception_score(two) == pytest.approx(1.0)
    assert adm.inception_score(two, split_size=10000) == pytest.approx(2.0, rel=1e-6)


def _line(xs, dim=8):
    p = np.zeros((len(xs), dim), np.float32)
    p[:, 0] = xs
    return p


@pytest.mark.parametrize('half,far,block', [(True, 20, 10000), (False, 1000, 10000), (True, 1000, 3)])
def test_precision_recall_constructed(half, far, block):
    """Reference points at 0..9 on a line; samples at 2..5 (on it) and 4 far away.
    Sample radii (3rd neighbour, squared): 9, 4, 4, 9 -> balls cover 0..8 but not 9.
    Far points at 1000 overflow float16 and take ADM's float32 fallback."""
    ref = _line(np.arange(10))
    samples = _line([2, 3, 4, 5, far, far + 1, far + 2, far + 3])
    np.testing.assert_array_equal(adm.manifold_radii(ref, block=block, half=half),
                                  [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
    np.testing.assert_array_equal(adm.manifold_radii(samples, block=block, half=half), [9, 4, 4, 9] * 2)
    assert adm.precision_recall(ref, samples, block=block, half=half) == (0.5, 0.9)
    assert adm.precision_recall(ref, ref, block=block, half=half) == (1.0, 1.0)


def test_precision_recall_matches_dense_numpy():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(70, 6)).astype(np.float32)
    smp = (rng.normal(size=(50, 6)) * 1.4 + 0.3).astype(np.float32)

    def dense(a, b):
        return ((a[:, None].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)

    r_ref = np.sort(dense(ref, ref), 1)[:, 3]
    r_smp = np.sort(dense(smp, smp), 1)[:, 3]
    d = dense(ref, smp)
    precision = (d <= r_ref[:, None]).any(0).mean()
    recall = (d <= r_smp[None, :]).any(1).mean()
    got = adm.precision_recall(ref, smp, block=16, half=False)
    np.testing.assert_allclose(got, (precision, recall), atol=1.5 / 50)  # at most a borderline flip
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    np.testing.assert_allclose(adm.manifold_radii(ref, block=16, half=False), r_ref, rtol=1e-5, atol=1e-5)


def test_evaluate_end_to_end(extractor, ref, tmp_path, monkeypatch):
    """Samples identical to the reference images: precision = recall = 1; IS from the logits; the
    FID/sFID calls get our statistics against the reference batch's (here: from the torch
    features). scipy's sqrtm of a 2048x2048 matrix takes about a minute on 2 cores, so the
    Frechet distance itself is tested on smaller matrices above."""
    order = np.array([0, 1, 0, 1])
    imgs = MIR.test_images()[order]
    pool = adm.statistics(ref['pool'][order])
    spatial = adm.statistics(ref['spatial'].reshape(2, -1)[order])
    np.savez(tmp_path / 'ref.npz', arr_0=imgs, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    np.savez(tmp_path / 'samples.npz', arr_0=imgs)
    calls = []

    def fake_fd(a, b):
        calls.append((a.mu.shape, float(np.abs(a.mu - b.mu).max() + np.abs(a.sigma - b.sigma).max())))
        return 0.0

    monkeypatch.setattr(adm, 'frechet_distance', fake_fd)
    res = adm.evaluate(tmp_path / 'samples.npz', tmp_path / 'ref.npz', extractor)
    assert list(res) == list(adm.METRIC_NAMES)
    assert res['Precision'] == 1.0 and res['Recall'] == 1.0
    assert res['Inception Score'] == pytest.approx(adm.inception_score(ref['logits'][order]), rel=1e-5)
    assert [c[0] for c in calls] == [(2048,), (2023,)] and max(c[1] for c in calls) < 1e-4
    assert adm.format_results(res).splitlines()[0].startswith('Inception Score: ')


# ---------------------------------------------------------------------------- CLI errors
def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'var_jax.evaluate', *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def npz_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('npz')
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    stats = {k: np.zeros(s) for k, s in inputs.STAT_SHAPES.items()}
    files = {
        'good': (img, {}),
        'wrong_key': (None, {'images': img}),
        'float': (img.astype(np.float32), {}),
        'nchw': (img.transpose(0, 3, 1, 2).copy(), {}),
        'gray': (img[..., 0], {}),
        'ref': (img, stats),
        'ref_32': (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), stats),
        'ref_badstats': (img, {**stats, 'sigma': np.zeros((64, 64))}),
    }
    out = {}
    for name, (arr, extra) in files.items():
        kw = dict(extra) if arr is None else {'arr_0': arr, **extra}
        np.savez(d / f'{name}.npz', **kw)
        out[name] = d / f'{name}.npz'
    (d / 'weights.pth').write_bytes(b'not checked before the inputs')
    out['weights'] = d / 'weights.pth'
    (d / 'text.npz').write_text('hello')
    out['text'] = d / 'text.npz'
    return out


CLI_CASES = {
    'no mode': ([], 'nothing to evaluate'),
    'partial ADM flags': (['--samples', '{good}'], 'also needs --ref and --inception'),
    'unknown flag': (['--sample', '{good}'], 'unrecognized arguments'),
    'bad batch size': (['--samples', '{good}', '--ref', '{ref}', '--inception', '{weights}', '--batch_size', '0'],
                       '--batch_size must be positive'),
    'missing samples': (['--samples', '{good}.missing', '--ref', '{ref}', '--inception', '{weights}'],
                        'no such file'),
    'not an npz': (['--samples', '{text}', '--ref', '{ref}', '--inception', '{weights}'], 'not an .npz file'),
    'wrong key': (['--samples', '{wrong_key}', '--ref', '{ref}', '--inception', '{weights}'],
                  "no array 'arr_0' in this npz (found 'images')"),
    'wrong dtype': (['--samples', '{float}', '--ref', '{ref}', '--inception', '{weights}'],
                    'arr_0 must be uint8 images'),
    'NCHW': (['--samples', '{nchw}', '--ref', '{ref}', '--inception', '{weights}'], 'N x H x W x 3'),
    'grayscale': (['--samples', '{gray}', '--ref', '{ref}', '--inception', '{weights}'], 'N x H x W x 3'),
    'ref without stats': (['--samples', '{good}', '--ref', '{good}', '--inception', '{weights}'],
                          'no precomputed statistics'),
    'ref stats of other dims': (['--samples', '{good}', '--ref', '{ref_badstats}', '--inception', '{weights}'],
                                'sigma must be a float array of shape (2048, 2048)'),
    'size mismatch': (['--samples', '{good}', '--ref', '{ref_32}', '--inception', '{weights}'],
                      'samples are 16x16 but the reference batch'),
    'missing weights': (['--samples', '{good}', '--ref', '{ref}', '--inception', '{weights}.missing'],
                        'pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'),
    # the same checks behind the subcommands, which take only their own flags
    'adm: wrong key': (['adm', '--samples', '{wrong_key}', '--ref', '{ref}', '--inception', '{weights}'],
                       "no array 'arr_0' in this npz (found 'images')"),
    'adm: partial flags': (['adm', '--samples', '{good}'], 'the following arguments are required: --ref, --inception'),
    'adm: a flag of another mode': (['adm', '--samples', '{good}', '--ref', '{ref}', '--inception', '{weights}',
                                     '--workdir', 'w'], 'unrecognized arguments: --workdir w'),
    'builtin: missing workdir': (['builtin'], 'the following arguments are required: --workdir'),
    'tokenizer: missing data': (['tokenizer', '--tokenizer', '{good}'], 'the following arguments are required: --data'),
    'unknown subcommand': (['fid', '--samples', '{good}'], 'unrecognized arguments: fid'),
}


@pytest.mark.parametrize('mode, flags', [('adm', ['--samples', '--ref', '--inception', '--batch_size']),
                                         ('builtin', ['--workdir', '--per_class', '--cfg', '--seed']),
                                         ('tokenizer', ['--tokenizer', '--data', '--inception', '--out'])])
def test_each_subcommand_has_its_own_help(mode, flags, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main([mode, '--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f'usage: python -m var_jax.evaluate {mode} ')
    assert all(f in out for f in flags) and ('--workdir' in out) == (mode == 'builtin'), out


@pytest.mark.parametrize('case', list(CLI_CASES))
def test_cli_bad_inputs(case, npz_files):
    args, expect = CLI_CASES[case]
    r = _cli(*(a.format(**npz_files) for a in args))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ''
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    assert expect in lines[0], lines[0]
