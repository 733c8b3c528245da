"""Pre-tokenized VAR training (issue 18, item 2): `python -m var_jax.pretokenize` + data.source='tokens'.

The same crops give the same tokens and the same train-step loss as the on-the-fly path; VAR
trains from tokens through `var_task.run`; an
interrupted run resumes without redoing finished shards and leaves no partial file; tokens of
another tokenizer (or other settings) are refused with one line; built-in, image-folder and TFDS
sources. Models are the tiny 16 px tokenizer / depth-2 VAR of test_train.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, TOK, override, prepare_tiny_tfds
from PIL import Image

from var_jax import bench
from var_jax.data import pipeline, token_writer, tokens
from var_jax.io import checkpoint
from var_jax.models import create
from var_jax.training import configs, loop, var_task

L = 1 + 4 + 16


def tiny_config(tokenizer_dir, **kw):
    c = configs.var_recipe(depth=2, batch_size=8, epochs=0, tblr=1e-4, alng=1e-3, wpe=0.1)
    c.update(total_steps=2, log_every=1, checkpoint_every=2)
    c.model.update(width=64, num_heads=1, dtype='float32', drop_path_rate=0.0, num_classes=10)
    c.data = configs.data_config(source='builtin', image_size=16, workers=0)
    c.tokenizer.checkpoint = str(tokenizer_dir)
    c.optim.update(lr=3e-3, wp_epochs=0.001)
    c.sample.update(per_class=0)
    c.mesh.num_devices = 1
    return override(c, **kw)


def token_config(tokenizer_dir, path, **kw):
    return tiny_config(tokenizer_dir, **{'data.source': 'tokens', 'data.path': str(path), **kw})


@pytest.fixture(scope='module')
def builtin_tokens(tokenizer_dir, tmp_path_factory):
    """The first 16 built-in images, one centred unflipped view each, in 2 shards."""
    out = tmp_path_factory.mktemp('builtin') / 'tokens'
    m = token_writer.write_tokens(tiny_config(tokenizer_dir), str(out), views=1, batch=8, shard_size=8, max_images=16)
    assert m['complete'] and m['images'] == 16 and m['records'] == 16 and m['num_shards'] == 2
    return out


def first_batch(config, n=8):
    it, source = pipeline.make_dataset(config.data, split='train', local_batch=n, seed=0, train=False)
    return next(iter(it)), source


def encode(tokenizer_dir, images):
    vq, _ = checkpoint.load_model(tokenizer_dir, tokenizer_only=True)
    idx, _ = vq.quantize.tokenize(vq.encode(loop.images_to_float(np.asarray(images))))
    return np.concatenate([np.asarray(i) for i in idx], 1)


def one_step(config, batch):
    """Loss and updated parameters of one train step from a fresh state (seed 0)."""
    vq, _ = checkpoint.load_model(config.tokenizer.checkpoint, tokenizer_only=True)
    task = var_task.build(config, tokenizer=var_task.given_tokenizer(vq))  # given tokenizer: nothing written
    s = loop.setup(task, config, dataset_size=16)
    state = s.init_fn(jax.random.key(0))
    batch = {k: jax.device_put(np.asarray(batch[k]), s.batch_shardings[k]) for k in s.batch_shardings}
    state, m = s.step_fn(state, batch, s.frozen)
    return float(m['loss']), float(m['Accm']), jax.device_get(state.params)


@pytest.mark.slow
def test_same_crops_same_tokens_and_loss(tokenizer_dir, builtin_tokens):
    img_cfg, tok_cfg = tiny_config(tokenizer_dir), token_config(tokenizer_dir, builtin_tokens)
    img_batch, _ = first_batch(img_cfg)  # centre crops, source order
    tok_batch, source = first_batch(tok_cfg)  # view 0, source order
    assert tok_batch['tokens'].dtype == np.int16 and tok_batch['tokens'].shape == (8, L)
    np.testing.assert_array_equal(tok_batch['label'], img_batch['label'])
    np.testing.assert_array_equal(tok_batch['tokens'], encode(tokenizer_dir, img_batch['image']))
    assert source.num_classes == 10 and source.class_names[0] == 'disc'

    loss_i, acc_i, params_i = one_step(img_cfg, img_batch)
    loss_t, acc_t, params_t = one_step(tok_cfg, tok_batch)
    np.testing.assert_allclose(loss_t, loss_i, rtol=1e-6)
    assert acc_t == acc_i
    for a, b in zip(jax.tree.leaves(params_t), jax.tree.leaves(params_i)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_from_tokens(tokenizer_dir, builtin_tokens, tmp_path):
    c = token_config(tokenizer_dir, builtin_tokens)  # the step of the test above: a compile-cache hit
    out = var_task.run(c, tmp_path / 'w')
    assert np.isfinite(out['Lm']) and out['data_skipped_total'] == 0
    _, var = checkpoint.load_model(tmp_path / 'w', need_var=True)
    assert var.config.num_classes == 10


def test_other_tokenizer_or_settings_refused(tokenizer_dir, builtin_tokens, tmp_path):
    other = tmp_path / 'other_tok'
    checkpoint.save_model(other, vqvae=create(TOK, seed=4))
    with pytest.raises(ValueError, match='another tokenizer: fingerprint'):
        var_task.run(token_config(other, builtin_tokens), tmp_path / 'w')
    with pytest.raises(ValueError, match=f'set config.tokenizer.checkpoint .* manifest names {tokenizer_dir}'):
        var_task.run(token_config(tokenizer_dir, builtin_tokens, **{'tokenizer.checkpoint': ''}), tmp_path / 'w2')
    assert not (tmp_path / 'w2').exists()
    m = tokens.read_manifest(str(builtin_tokens))
    with pytest.raises(ValueError, match=r'patch_nums \[1, 2, 4\] there, \[1, 2, 3, 4\]'):
        tokens.check_matches(m, TOK.replace(patch_nums=(1, 2, 3, 4)), None, 'DIR')
    with pytest.raises(ValueError, match='vocab_size 64 there, 128'):
        tokens.check_matches(m, TOK.replace(vocab_size=128), None, 'DIR')
    with pytest.raises(ValueError, match='crops: 1 there, 2 now'):  # same --out, other settings
        token_writer.write_tokens(tiny_config(tokenizer_dir), str(builtin_tokens), views=2, batch=8, shard_size=8,
                        max_images=16)
    with pytest.raises(ValueError, match='a tokenizer needs images'):
        configs.check(token_config(tokenizer_dir, builtin_tokens), 'tokenizer')


def test_interrupted_run_resumes_finished_shards(tokenizer_dir, tmp_path, monkeypatch):
    out = str(tmp_path / 'tokens')
    args = dict(views=1, batch=8, shard_size=4, max_images=12)
    calls = []
    real = tokens.encode_record

    def fail_in_second_shard(*a):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(tokens, 'encode_record', fail_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        token_writer.write_tokens(tiny_config(tokenizer_dir), out, **args)
    monkeypatch.undo()
    paths = tokens.shard_paths(out, 3)
    assert sorted(os.listdir(out)) == ['manifest.json', os.path.basename(paths[0])]  # no partial shard
    with pytest.raises(ValueError, match=r'incomplete \(1 of 3 shards\)'):
        tokens.TokenSource(out)
    first = os.stat(paths[0])
    stale = paths[1] + '.tmp-99999999'  # as left by a kill -9
    open(stale, 'wb').write(b'partial')
    m = token_writer.write_tokens(tiny_config(tokenizer_dir), out, **args)
    assert m['complete'] and m['images'] == 12 and not os.path.exists(stale)
    again = os.stat(paths[0])
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
    fresh = str(tmp_path / 'fresh')
    token_writer.write_tokens(tiny_config(tokenizer_dir), fresh, **args)
    for a, b in zip(paths, tokens.shard_paths(fresh, 3)):
        assert open(a, 'rb').read() == open(b, 'rb').read()
    # complete: nothing to do
    assert token_writer.write_tokens(tiny_config(tokenizer_dir), out, **args)['records'] == 12


@pytest.mark.parametrize('kind', ['imagefolder', 'tfds'])
def test_image_sources_views_flips_and_unreadable(tokenizer_dir, tmp_path, kind):
    """views=2 with flips: view 0 is the centre crop of the official resize, view 1 its mirror,
    views 2-3 a seeded crop and its mirror; unreadable images have no records and are counted."""
    root = tmp_path / 'images'
    if kind == 'tfds':
        data = configs.data_config(source='tfds', name='var_jax_tiny', data_dir=str(prepare_tiny_tfds(root)),
                                      image_size=16, workers=0, hflip=True)
        n, bad = 16, 1
    else:
        rng = np.random.default_rng(0)
        for c in ('a', 'b'):
            (root / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / c / f'{i}.png')
        (root / 'b' / '1.png').write_bytes(b'not an image')
        data = configs.data_config(source='imagefolder', path=str(root), image_size=16, workers=0, hflip=True)
        n, bad = 6, 1
    c = tiny_config(tokenizer_dir)
    c.data = data
    out = tmp_path / 'tokens'
    m = token_writer.write_tokens(c, str(out), views=2, batch=8, shard_size=4)
    assert (m['source_images'], m['skipped'], m['images'], m['views']) == (n, bad, n - bad, 4)
    src = tokens.TokenSource(str(out))
    assert len(src) == n - bad
    raw = pipeline.make_source(data, 'train')
    rec = [tokens.decode_record(src.records[k], L, src.dtype) for k in range(len(src.records))]
    assert [r[2] for r in rec] == [0, 1, 2, 3] * (n - bad)
    index = [r[3] for r in rec[::4]]
    assert len(set(index)) == n - bad and all(r[1] == int(raw[r[3]]['label']) for r in rec)
    centre = pipeline.CenterCrop(16)
    imgs = [centre.map(pipeline.SafeSource(raw)[i])['image'] for i in index]
    views = np.stack([v for im in imgs for v in (im, im[:, ::-1])])
    got = np.stack([r[0] for r in rec if r[2] < 2])
    np.testing.assert_array_equal(got, encode(tokenizer_dir, views))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(rec[::4], rec[2::4]))  # other crops differ


def test_cli_bad_input_one_line(tmp_path, tokenizer_dir):
    f = tmp_path / 'file'
    f.write_text('x')
    base = [sys.executable, '-m', 'var_jax.pretokenize', f'--config={REPO / "configs" / "tiny.py"}']
    for extra, msg in (([f'--out={f}', f'--config.tokenizer.checkpoint={tokenizer_dir}'], 'is a file'),
                       ([f'--out={tmp_path / "o"}'], 'no tokenizer'),
                       ([f'--out={tmp_path / "o"}', f'--workdir={tmp_path}'], 'holds no trained tokenizer')):
        r = subprocess.run(base + extra, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and msg in r.stderr, r.stderr
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow  # two compiles of the CI model: ~1-2 min on 2 shared cores
def test_bench_train_from_tokens(capsys):
    rc = bench.main(['train', '--config', str(REPO / 'configs' / 'tiny.py') + ':ci', '--batch', '2',
                     '--warmup', '1', '--repeats', '1', '--tokens'])
    out = capsys.readouterr().out
    assert rc == 0, out
    (row,) = [line for line in out.splitlines() if line.startswith('| 2 ')]
    batch, ms, img_s, tok_ms, tok_img_s, ratio = [c.strip() for c in row.strip('|').split('|')]
    assert float(ms) > 0 and float(tok_ms) > 0 and ratio.endswith('x')
    assert bench.main(['train', '--config', str(REPO / 'configs' / 'tokenizer_tiny.py'), '--tokens']) == 2
    assert 'a tokenizer config has none' in capsys.readouterr().err
