"""Tokenizer metrics (`var_jax.eval.tokenizer_metrics`, `python -m var_jax.evaluate --tokenizer`):
the metric functions on constructed inputs, the sharded program against the model called
directly (with a tail batch that needs padding and a row that stands in for an unreadable file),
an identity tokenizer through a random-weight Inception, the CLI end to end, and its bad inputs.

One 16-px tokenizer is built once. Inception costs ~6 GFLOP per image on CPU and scipy's sqrtm of
a 2048x2048 matrix about a minute on 2 cores, so the real (random-weight) Inception runs only in
the identity test, on one device, with its Frechet distance recorded rather than computed; the
CLI test loads a cheap stand-in network instead, small enough for the real Frechet distance.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import prepare_tiny_tfds
from flax import nnx
from PIL import Image

from var_jax import evaluate as cli
from var_jax.data import builtin
from var_jax.data.pipeline import FolderSource, make_dataset
from var_jax.eval import adm, inception
from var_jax.eval import tokenizer_metrics as tm
from var_jax.io import checkpoint
from var_jax.models import VQVAEConfig, create
from var_jax.models.perceptual import load_lpips_params, lpips

DATA = pathlib.Path(__file__).resolve().parent / 'data'
# 16 px (downsample 4, latent 4): LPIPS needs >= 16 px; three levels keep the compile short
TOK = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
BATCH = 8  # one image per fake CPU device (conftest)
N_IMAGES = 11  # not a multiple of BATCH: the tail batch is padded
_lpips = jax.jit(lpips)


def _mir():
    spec = importlib.util.spec_from_file_location('make_inception_ref', DATA / 'make_inception_ref.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # numpy only at import
    return mod


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def vqvae():
    return create(TOK, seed=0)


@pytest.fixture(scope='module')
def lpips_params():
    return load_lpips_params('')


@pytest.fixture(scope='module')
def random_inception():
    """InceptionV3 with the random pytorch-fid-layout weights of tests/data/make_inception_ref.py."""
    return inception.inception_from_state(_mir().random_state_dict(inception.state_dict_spec()))


class _ChannelStats(nnx.Module):
    """A cheap stand-in for Inception in the CLI test: 'pool' = mean and std of all values (2-d),
    small enough for the real Frechet distance."""

    def features(self, images):
        x = images.astype(jnp.float32).reshape(images.shape[0], -1)
        return {'pool': jnp.stack([x.mean(1), x.std(1)], -1)}


@pytest.fixture(scope='module')
def images():
    return builtin.load('test', 16)[0][:N_IMAGES]


@pytest.fixture(scope='module')
def rec(vqvae, lpips_params):
    return tm.Reconstructor(vqvae, BATCH, lpips_params)


@pytest.fixture(scope='module')
def direct(vqvae, lpips_params, images):
    """The model called directly, without the metrics program: tokens, then tokens -> image."""
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    idx = vqvae.img_to_idx(x)
    rec = _to_uint8(np.asarray(vqvae.idx_to_img(idx)))
    diff = rec.astype(np.float64) - images
    psnr = 10 * np.log10(255 ** 2 / np.mean(diff ** 2, axis=(1, 2, 3)))
    lp = np.asarray(_lpips(lpips_params, x, jnp.asarray(rec, jnp.float32) / 127.5 - 1))
    return {'idx': [np.asarray(i) for i in idx], 'rec': rec, 'psnr': psnr, 'lpips': lp}


def _to_uint8(x):
    """[-1, 1] -> uint8 as var_jax.sample / viz.to_uint8 write PNGs, in numpy."""
    return (np.clip((x + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8)


def _counts(idx_list, rows, vocab=TOK.vocab_size):
    return np.stack([np.bincount(i[rows].ravel(), minlength=vocab) for i in idx_list])


class _RecordFrechet:
    """Stands in for adm.frechet_distance (2048x2048 sqrtm): records its statistics, returns 0."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, b):
        self.calls.append((a, b))
        return 0.0


# ---------------------------------------------------------------------------- metric functions
def test_psnr_formula():
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 3  # MSE 9
    b[1, 0, 0, 0] += 12  # MSE 144 / 48 = 3
    sse = ((b.astype(np.float64) - a) ** 2).sum((1, 2, 3))
    np.testing.assert_allclose(tm.psnr(sse, 48), [10 * np.log10(255 ** 2 / 9), 10 * np.log10(255 ** 2 / 3)],
                               rtol=1e-12)
    assert tm.psnr([0.0], 48)[0] == pytest.approx(100.0)  # identical images hit the documented floor


def test_usage_and_perplexity():
    counts = np.array([[5, 5, 0, 0], [1, 1, 1, 1], [0, 0, 0, 7]])
    u = tm.usage(counts)
    assert u['codes_used'] == [2, 4, 1] and u['usage'] == [50.0, 100.0, 25.0]
    assert u['codes_used_overall'] == 4 and u['usage_overall'] == 100.0
    np.testing.assert_allclose(u['perplexity'], [2.0, 4.0, 1.0], rtol=1e-12)
    p = np.array([6, 6, 1, 8]) / 21
    assert u['perplexity_overall'] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert tm.perplexity(np.zeros((1, 4)))[0] == 0.0


def test_rfid_function():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 24))
    assert abs(tm.rfid(a, a)) < 1e-6
    np.testing.assert_allclose(tm.rfid(a, a + 1.0), 24.0, rtol=1e-6)  # a mean shift of 1 in d dims: FID = d


# ---------------------------------------------------------------------------- the program vs the model
def test_metrics_match_the_model_called_directly(rec, vqvae, images, direct):
    """11 images as two pipeline batches of 6 and 5, both padded to 8 rows; row 2 has `skipped` = 1
    (SafeSource's stand-in for an unreadable file: a duplicate of a later image). Counts, PSNR and
    LPIPS equal the direct computation over the other 10 images: neither padding nor the
    duplicate leaks into anything."""
    skipped = np.zeros(N_IMAGES, np.int32)
    skipped[2] = 1
    batches = [{'image': images[:6], 'skipped': skipped[:6], 'label': np.zeros(6)},
               {'image': images[6:], 'skipped': skipped[6:], 'label': np.zeros(5)}]
    res = tm.evaluate(vqvae, batches, reconstructor=rec)
    keep = np.arange(N_IMAGES) != 2
    assert res['images'] == N_IMAGES - 1 and res['skipped'] == 1
    np.testing.assert_array_equal(res['counts'].sum(1), (N_IMAGES - 1) * np.array([p * p for p in TOK.patch_nums]))
    np.testing.assert_array_equal(res['counts'], _counts(direct['idx'], keep))
    np.testing.assert_allclose(res['per_image']['psnr'], direct['psnr'][keep], atol=1e-3)
    np.testing.assert_allclose(res['per_image']['lpips'], direct['lpips'][keep], atol=1e-5)
    assert res['psnr'] == pytest.approx(direct['psnr'][keep].mean(), abs=1e-3)
    expect = tm.usage(_counts(direct['idx'], keep))
    assert res['usage'] == expect['usage'] and res['perplexity'] == pytest.approx(expect['perplexity'])
    assert res['rfid'] is None
    assert set(tm.summary(res)) >= {'psnr', 'lpips', 'rfid', 'usage', 'usage_overall', 'perplexity', 'images'}


def test_max_images_stops_mid_stream(rec, vqvae, images, direct):
    res = tm.evaluate(vqvae, [images[:4], images[4:], images], reconstructor=rec, max_images=6)
    assert res['images'] == 6 and res['skipped'] == 0
    np.testing.assert_array_equal(res['counts'], _counts(direct['idx'], slice(0, 6)))


def test_identity_tokenizer_through_inception(random_inception, lpips_params, images):
    """A tokenizer that returns its input: PSNR at the cap, LPIPS 0, and identical Inception
    statistics of originals and reconstructions, whose Frechet distance (on a block small enough
    for sqrtm here) is 0. One device and batches of one image: Inception is the slow part on CPU."""
    class Quantize(nnx.Module):
        def tokenize(self, f):
            return [jnp.zeros((f.shape[0], p * p), jnp.int32) for p in TOK.patch_nums], f

    class Identity(nnx.Module):
        def __init__(self):
            self.config, self.quantize = TOK, Quantize()

        def encode(self, x):
            return x

        def decode(self, f):
            return jnp.clip(f, -1, 1)

    record = _RecordFrechet()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adm, 'frechet_distance', record)
        res = tm.evaluate(Identity(), [images[:2]], lpips_params=lpips_params, batch_size=1,
                          inception=random_inception, devices=jax.local_devices()[:1])
    assert res['psnr'] == pytest.approx(100.0) and abs(res['lpips']) < 1e-9 and res['rfid'] == 0.0
    (real, recon), = record.calls
    assert real.mu.shape == (2048,) and np.array_equal(real.mu, recon.mu) and np.array_equal(real.sigma, recon.sigma)
    assert np.abs(real.sigma).max() > 0  # different images: not a degenerate covariance
    block = adm.FIDStatistics(real.mu[:1], real.sigma[:1, :1])  # 2 images: rank 1
    assert abs(adm.frechet_distance(block, block)) < 1e-6
    assert res['codes_used'] == [1] * len(TOK.patch_nums)  # every token is code 0
    assert res['perplexity'] == [1.0] * len(TOK.patch_nums)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope='module')
def cli_inputs(vqvae, tmp_path_factory):
    """A saved tiny tokenizer and an image folder of 10 PNGs (24x20: resized to 18, cropped to 16)
    plus one corrupt file, in two class folders."""
    d = tmp_path_factory.mktemp('tok_cli')
    checkpoint.save_model(d / 'tok', vqvae=vqvae)
    folder = d / 'images'
    rng = np.random.default_rng(0)
    src = builtin.load('test', 24)[0][:10]
    originals = []
    for i, img in enumerate(src):
        (folder / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        arr = np.ascontiguousarray(img[:20] if i % 3 else img[:, :20])  # landscape and portrait
        arr = np.clip(arr.astype(int) + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f'c{i % 2}' / f'{i:02d}.png')
        originals.append(arr)
    (folder / 'c0' / '05_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (d / 'empty').mkdir()
    (d / 'empty_classes' / 'c0').mkdir(parents=True)
    flat = d / 'flat'  # the same images with no class subfolders (e.g. ImageNet's validation folder)
    flat.mkdir()
    for f in folder.glob('*/*.png'):
        (flat / f.name).write_bytes(f.read_bytes())
    (d / 'mixed' / 'c0').mkdir(parents=True)
    (d / 'mixed' / 'stray.png').write_bytes((folder / 'c0' / '00.png').read_bytes())
    (d / 'not_a_tokenizer.txt').write_text('hello')
    return {'tok': d / 'tok', 'images': folder, 'dir': d}


def _expected(vqvae, folder, n: int):
    """For the first n readable files: the official eval transform written out here (Lanczos
    shorter side to round(1.125 * 16) = 18, centre crop 16), the model called directly; mean PSNR
    on uint8, and the Frechet distance of the stand-in features of originals and reconstructions."""
    files = sorted((p for p in folder.glob('*/*.png') if 'corrupt' not in p.name),
                   key=lambda p: (p.parent.name, p.name))
    crops = []
    for f in files[:n]:
        im = Image.open(f).convert('RGB')
        w, h = im.size
        s = 18 / min(w, h)
        im = im.resize((max(18, round(w * s)), max(18, round(h * s))), Image.LANCZOS)
        w, h = im.size
        x, y = (w - 16) // 2, (h - 16) // 2
        crops.append(np.asarray(im.crop((x, y, x + 16, y + 16)), np.uint8))
    crops = np.stack(crops)
    padded = np.concatenate([crops, np.repeat(crops[:1], N_IMAGES - n, 0)])  # the shape compiled for `direct`
    x = jnp.asarray(padded, jnp.float32) / 127.5 - 1
    rec = _to_uint8(np.asarray(vqvae.idx_to_img(vqvae.img_to_idx(x))))[:n]
    diff = rec.astype(np.float64) - crops
    psnr = float(np.mean(10 * np.log10(255 ** 2 / np.mean(diff ** 2, axis=(1, 2, 3)))))
    feats = _ChannelStats()
    fid = tm.rfid(np.asarray(feats.features(crops)['pool']), np.asarray(feats.features(rec)['pool']))
    return psnr, fid


def test_cli_end_to_end(cli_inputs, vqvae, capsys):
    """Folder data that needs resizing, with a corrupt file; no --inception: rFID absent, not 0."""
    out = cli_inputs['dir'] / 'metrics.json'
    code = cli.main(['--tokenizer', str(cli_inputs['tok']), '--data', str(cli_inputs['images']),
                     '--batch_size', str(BATCH), '--workers', '0', '--out', str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0] == 'images: 10 (1 unreadable skipped)'
    assert [ln.split(':')[0] for ln in lines] == ['images', 'PSNR', 'LPIPS', 'usage', 'perplexity']
    assert 'no --inception' in captured.err
    got = json.loads(out.read_text())
    assert {'psnr', 'lpips', 'rfid', 'usage', 'usage_overall', 'perplexity', 'perplexity_overall', 'codes_used',
            'images', 'skipped', 'image_size', 'patch_nums', 'tokenizer', 'data'} <= set(got)
    assert got['images'] == 10 and got['skipped'] == 1 and got['image_size'] == 16 and got['rfid'] is None
    assert len(got['usage']) == len(TOK.patch_nums) and 0 < got['lpips'] < 2
    assert got['psnr'] == pytest.approx(_expected(vqvae, cli_inputs['images'], 10)[0], abs=1e-3)
    assert float(lines[1].split(':')[1]) == pytest.approx(got['psnr'], abs=1e-4)
    assert not list(out.parent.glob('.metrics.json.*'))  # no temporary file left


def test_cli_on_a_flat_folder(cli_inputs, vqvae, capsys):
    """Images directly in the folder (no classes) are one unlabelled set: same images, same PSNR."""
    source = FolderSource(str(cli_inputs['dir'] / 'flat'))
    assert source.class_names == ('flat',) and len(source) == 11 and not source.labels.any()
    out = cli_inputs['dir'] / 'flat.json'
    flags = ['--tokenizer', str(cli_inputs['tok']), '--data', str(cli_inputs['dir'] / 'flat'),
             '--batch_size', str(BATCH), '--workers', '0', '--out', str(out)]
    code = cli.main(flags)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines()[0] == 'images: 10 (1 unreadable skipped)'
    got = json.loads(out.read_text())
    assert got['psnr'] == pytest.approx(_expected(vqvae, cli_inputs['images'], 10)[0], abs=1e-3)
    # the subcommand form: the same evaluation, the same output
    assert cli.main(['tokenizer', *flags]) == 0
    assert capsys.readouterr().out == captured.out and json.loads(out.read_text()) == got


def test_cli_on_a_tfds_split(cli_inputs, capsys):
    """--data tfds:NAME:SPLIT --data_dir: a prepared array_record dataset, read without TensorFlow."""
    data_dir = prepare_tiny_tfds(cli_inputs['dir'] / 'tfds')
    out = cli_inputs['dir'] / 'tfds.json'
    code = cli.main(['--tokenizer', str(cli_inputs['tok']), '--data', 'tfds:var_jax_tiny:validation',
                     '--data_dir', str(data_dir), '--batch_size', str(BATCH), '--workers', '0', '--out', str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines()[0] == 'images: 5 (0 unreadable skipped)'
    got = json.loads(out.read_text())
    assert got['images'] == 5 and got['image_size'] == 16 and np.isfinite(got['psnr'])
    code = cli.main(['--tokenizer', str(cli_inputs['tok']), '--data', 'tfds:var_jax_tiny:validation[:3]',
                     '--data_dir', str(data_dir), '--batch_size', str(BATCH), '--workers', '0'])
    assert code == 0 and capsys.readouterr().out.splitlines()[0] == 'images: 3 (0 unreadable skipped)'
    code = cli.main(['--tokenizer', str(cli_inputs['tok']), '--data', 'tfds:var_jax_tiny:test', '--data_dir',
                     str(data_dir)])
    err = capsys.readouterr().err
    assert code == 2 and 'var_jax_tiny' in err and 'Traceback' not in err


def test_cli_with_inception(cli_inputs, vqvae, capsys):
    """--inception wired through to the rFID (a cheap stand-in network is loaded in place of the
    weights file); --max_images counts files read, the unreadable one included."""
    out = cli_inputs['dir'] / 'with_rfid.json'
    weights = cli_inputs['dir'] / 'inception.pth'
    weights.write_bytes(b'replaced by the stand-in')
    loaded = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, 'load_inception', lambda path: loaded.append(path) or _ChannelStats())
        code = cli.main(['--tokenizer', str(cli_inputs['tok']), '--data', str(cli_inputs['images']),
                         '--inception', str(weights), '--max_images', '4', '--batch_size', str(BATCH),
                         '--workers', '0', '--out', str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert loaded == [str(weights)] and 'note: rFID over 3 images' in captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0] == 'images: 3 (1 unreadable skipped)'  # c0: 00, 02, 04, then the corrupt file
    assert lines[3].startswith('rFID: ')
    got = json.loads(out.read_text())
    psnr, fid = _expected(vqvae, cli_inputs['images'], 3)
    assert got['psnr'] == pytest.approx(psnr, abs=1e-3)
    assert got['rfid'] == pytest.approx(fid, rel=1e-3) and fid > 0


def test_builtin_data():
    """`--data builtin`: the shapes10 test split, generated at the tokenizer's size (no resize)."""
    ds, source = make_dataset(tm.data_config('builtin', 16), split='eval', local_batch=600, seed=0, train=False)
    batches = list(ds)
    assert len(source) == 1000 and [len(b['image']) for b in batches] == [600, 400]
    np.testing.assert_array_equal(batches[0]['image'][:N_IMAGES], builtin.load('test', 16)[0][:N_IMAGES])
    assert tm.parse_tfds('tfds:imagenet2012:5.1.0:validation[:1000]') == ('imagenet2012:5.1.0', 'validation[:1000]')


BAD_INPUTS = {
    'missing tokenizer': (['--tokenizer', '{dir}/nope', '--data', 'builtin'], 'no such checkpoint, workdir or file'),
    'directory without model.json': (['--tokenizer', '{dir}/empty', '--data', 'builtin'], 'no model.json'),
    'checkpoint without a tokenizer': (['--tokenizer', '{dir}/var_only', '--data', 'builtin'],
                                       'holds no tokenizer config'),
    'not a tokenizer file': (['--tokenizer', '{dir}/not_a_tokenizer.txt', '--data', 'builtin'],
                             'nor an official tokenizer file'),
    'official file at an unknown size': (['--tokenizer', '{dir}/vae.pth', '--data', 'builtin', '--image_size', '128'],
                                         'an official VAR tokenizer file runs at 256 or 512 px'),
    'tfds without split': (['--tokenizer', '{tok}', '--data', 'tfds:imagenet2012'], 'expected tfds:NAME:SPLIT'),
    'missing folder': (['--tokenizer', '{tok}', '--data', '{dir}/nope'], 'no such image folder'),
    'empty folder': (['--tokenizer', '{tok}', '--data', '{dir}/empty'], 'has no class subfolders and no images'),
    'mixed folder layouts': (['--tokenizer', '{tok}', '--data', '{dir}/mixed'],
                             'has both class subfolders and 1 images at its top level'),
    'folder without images': (['--tokenizer', '{tok}', '--data', '{dir}/empty_classes'], 'contains no images'),
    'data_dir without tfds': (['--tokenizer', '{tok}', '--data', '{images}', '--data_dir', '{dir}'],
                              '--data_dir applies to tfds'),
    'size not a multiple': (['--tokenizer', '{tok}', '--data', 'builtin', '--image_size', '18'],
                            'not a multiple of its downsampling factor 4'),
    'size off the patch grid': (['--tokenizer', '{tok}', '--data', 'builtin', '--image_size', '32'],
                                'last scale is 4x4 tokens on the full latent grid and it downsamples by 4, so it '
                                'takes 16 px images only'),
    'max_images 0': (['--tokenizer', '{tok}', '--data', 'builtin', '--max_images', '0'], '--max_images must be >= 1'),
    'missing inception': (['--tokenizer', '{tok}', '--data', 'builtin', '--inception', '{dir}/pt_inception.pth'],
                          'pytorch-fid/releases/download'),
    'missing lpips': (['--tokenizer', '{tok}', '--data', 'builtin', '--lpips', '{dir}/vgg16.ckpt'],
                      'LPIPS weights not found'),
    'out in a missing folder': (['--tokenizer', '{tok}', '--data', 'builtin', '--out', '{dir}/nope/m.json'],
                                'not a writable file path'),
    'with ADM flags': (['--tokenizer', '{tok}', '--data', 'builtin', '--samples', 's.npz'],
                       'cannot be combined with --samples'),
    'with --workdir': (['--tokenizer', '{tok}', '--data', 'builtin', '--workdir', '{dir}'],
                       'cannot be combined with --workdir'),
    'no --data': (['--tokenizer', '{tok}'], 'also need --data'),
    'tokenizer flags alone': (['--data', 'builtin', '--max_images', '3'],
                              '--data, --max_images only apply to the tokenizer metrics'),
}


@pytest.fixture(scope='module')
def bad_paths(cli_inputs):
    d = cli_inputs['dir']
    checkpoint.write_model_json(d / 'var_only', vqvae=None, var=None)
    (d / 'vae.pth').write_bytes(b'not read: the size is checked first')
    return {'dir': d, 'tok': cli_inputs['tok'], 'images': cli_inputs['images']}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_cli_bad_inputs(case, bad_paths, capsys):
    args, expect = BAD_INPUTS[case]
    code = cli.main([a.format(**bad_paths) for a in args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
    assert expect in lines[0], lines[0]
