"""Own data (docs/own_data.md): the folder presets and scales, the held-out split, the trap of a tokenizer
trained on other data, the folder judge end to end, fine-tuning official weights on new classes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, fixture_dir, override
from ml_collections import ConfigDict
from PIL import Image, ImageDraw

from var_jax import evaluate
from var_jax.data.pipeline import FolderSource, make_source
from var_jax.data.split import held_out_mask
from var_jax.eval import builtin_score, folder_score, modes
from var_jax.io import checkpoint, official
from var_jax.models.config import PATCH_NUMS_256, PATCH_NUMS_512, downsample_for, patch_nums_for
from var_jax.training import configs, finetune, own_data

SHAPES = ('circle', 'cross', 'square', 'triangle')


def make_shapes_folder(root, per_class: int = 75, size: int = 32, seed: int = 0):
    """root/<shape>/<i>.png: one light shape of random size, place and colours on a dark ground per image."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            bg = tuple(int(v) for v in rng.integers(0, 90, 3))
            fg = tuple(int(v) for v in rng.integers(150, 256, 3))
            im = Image.new('RGB', (size, size), bg)
            draw = ImageDraw.Draw(im)
            r = rng.uniform(0.25, 0.38) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if name == 'circle':
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif name == 'square':
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif name == 'triangle':
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
            else:
                w = r / 3
                draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
                draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
            im.save(root / name / f'{i:04d}.png')
    return root


def repo_config(name: str, arg=None, **dotted):
    """configs/<name>.py's get_config(arg), with `dotted` fields set."""
    spec = importlib.util.spec_from_file_location(f'_config_{name}', REPO / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return override(module.get_config(arg), **dotted)


def folder_config(arg='size=ci', **dotted):
    return repo_config('folder', arg, **dotted)


# ---------------------------------------------------------------------------- scales for a resolution
def test_patch_nums_presets_and_rule():
    assert patch_nums_for(32) == patch_nums_for(64) == (1, 2, 3, 4, 6, 8)
    assert patch_nums_for(128) == patch_nums_for(256) == PATCH_NUMS_256
    assert patch_nums_for(512) == PATCH_NUMS_512
    for size in (48, 96, 192, 384):  # the rule: from 1 up to the full latent, strictly increasing
        pn = patch_nums_for(size)
        assert pn[0] == 1 and pn[-1] == size // downsample_for(size)
        assert all(b > a for a, b in zip(pn, pn[1:]))
    assert patch_nums_for(96) == (1, 2, 3, 4, 6, 8, 10, 12)
    with pytest.raises(ValueError, match='multiple of 8'):
        patch_nums_for(100)


@pytest.mark.parametrize('res', [32, 64, 128, 256])
def test_folder_presets_build_matching_models(res):
    c = folder_config(f'res={res}')
    vq = configs.vqvae_model_config(c.tokenizer.train.model)
    assert vq.image_size == res and vq.patch_nums == patch_nums_for(res) == tuple(c.model.patch_nums)
    assert c.data.image_size == res and c.data.source == 'imagefolder'
    assert 'data' not in c.tokenizer.train  # given once: the tokenizer phase reads config.data
    with pytest.raises(ValueError, match='unknown config argument'):
        folder_config('resolution=64')
    big = folder_config(f'res={res},size=gpu', **{'data.path': 'DIR'})
    assert configs.vqvae_model_config(big.tokenizer.train.model).image_size == res
    configs.check(big, 'var')
    with pytest.raises(ValueError, match='size must be'):
        folder_config('size=huge')


# ---------------------------------------------------------------------------- the held-out split
def _touch_folder(root, counts):
    for c, n in counts.items():
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            (root / c / f'img_{i:03d}.png').write_bytes(b'')
    return root


def test_split_is_deterministic_stable_and_covers_every_class(tmp_path):
    root = _touch_folder(tmp_path / 'a', {'cat': 40, 'dog': 3, 'eel': 1})
    data = ConfigDict(dict(source='imagefolder', path=str(root), eval_path='', holdout=0.1, image_size=32))
    train, held = make_source(data, 'train'), make_source(data, 'eval')
    assert not set(train.files) & set(held.files)
    assert sorted(train.files + held.files) == sorted(FolderSource(str(root)).files)
    assert set(held.labels.tolist()) == {0, 1}  # every class of >= 2 images holds one out; eel (1 image) none
    assert held.class_names == train.class_names == ('cat', 'dog', 'eel')
    again = make_source(data, 'eval')
    assert again.files == held.files
    # adding images moves none of the others between the parts
    _touch_folder(root, {'cat': 60})
    held2 = make_source(data, 'eval')
    assert set(held.files) - {f for f in held.files if 'dog' in f} <= set(held2.files)
    # the same names under another root split the same way (the rule reads names relative to the root)
    other = _touch_folder(tmp_path / 'b', {'cat': 60, 'dog': 3, 'eel': 1})
    src = FolderSource(str(other))
    mask = held_out_mask(str(other), src.files, src.labels, 0.1)
    assert sorted(os.path.relpath(f, other) for f, m in zip(src.files, mask) if m) == \
        sorted(os.path.relpath(f, root) for f in held2.files)
    with pytest.raises(ValueError, match='holdout'):
        held_out_mask(str(root), src.files, src.labels, 1.5)


def test_without_holdout_the_folder_reads_as_before(tmp_path):
    root = _touch_folder(tmp_path / 'a', {'cat': 10, 'dog': 10})
    data = configs.data_config(source='imagefolder', path=str(root), image_size=32)
    assert len(make_source(data, 'train')) == len(make_source(data, 'eval')) == 20


# ---------------------------------------------------------------------------- the trap
def test_tokenizer_reads_config_data(tmp_path):
    c = folder_config(**{'data.path': str(tmp_path)})
    r = own_data.resolve(c)
    assert r.tokenizer.train.data.to_dict() == c.data.to_dict()
    assert 'data' not in c.tokenizer.train  # the given config is not changed


def test_tokenizer_on_other_data_is_an_error(tmp_path):
    c = repo_config('tiny')
    assert own_data.resolve(c) is c  # the built-in default: both phases on builtin 32px, nothing to do
    c.data.update(source='imagefolder', path=str(tmp_path))
    with pytest.raises(ValueError, match='tokenizer would train on other images than VAR.*source'):
        own_data.resolve(c)
    c.tokenizer.allow_other_data = True
    assert own_data.resolve(c) is c


def test_tokenizer_on_other_data_cli(tmp_path):
    root = _touch_folder(tmp_path / 'imgs', {'a': 2, 'b': 2})
    work = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-m', 'var_jax.train', '--config=configs/tiny.py',
                        '--config.data.source=imagefolder', f'--config.data.path={root}', f'--workdir={work}'],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith('error: the tokenizer would train on other images than VAR')
    assert not work.exists()


def test_builtin_judge_refuses_a_folder_run(tmp_path):
    (tmp_path / 'model.json').write_text(json.dumps({'var': {'num_classes': 10}, 'vqvae': {'ch': 16}}))
    (tmp_path / 'config.json').write_text(json.dumps({'data': {'source': 'imagefolder', 'path': str(tmp_path)}}))
    with pytest.raises(ValueError, match='only judges models trained on the built-in'):
        builtin_score.check_workdir(tmp_path)
    assert modes.is_folder_run(tmp_path) and not modes.is_folder_run(tmp_path / 'nope')
    assert folder_score.check_workdir(tmp_path)['data']['source'] == 'imagefolder'


# ---------------------------------------------------------------------------- fine-tuning pieces
def test_resize_class_embedding():
    t = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)  # 4 classes + the no-class row
    out = finetune.resize_class_embedding(t, 2)
    np.testing.assert_allclose(out[:2], np.repeat(t[:4].mean(0, keepdims=True), 2, 0))
    np.testing.assert_array_equal(out[2], t[4])
    mapped = finetune.resize_class_embedding(t, 3, class_map=(3, 0, 0))
    np.testing.assert_array_equal(mapped, t[[3, 0, 0, 4]])
    with pytest.raises(ValueError, match='not classes'):
        finetune.resize_class_embedding(t, 1, class_map=(4,))
    with pytest.raises(ValueError, match='entries'):
        finetune.resize_class_embedding(t, 2, class_map=(1,))


def test_frozen_mask_names_parameters():
    params = {'var': {'blocks': {'attn': {'w': np.zeros(2)}}, 'head': {'w': np.zeros(2)}}}
    mask = finetune.frozen_mask(params, ('blocks',))
    assert mask == {'var': {'blocks': {'attn': {'w': True}}, 'head': {'w': False}}}
    with pytest.raises(ValueError, match='matches no parameter'):
        finetune.frozen_mask(params, ('nothing_like_this',))


# ---------------------------------------------------------------------------- end to end
def _train(args, timeout=1500):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, '-m', 'var_jax.train', *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_folder_end_to_end_and_resume(tmp_path):
    root = make_shapes_folder(tmp_path / 'shapes')
    work = tmp_path / 'run'
    args = ['--config=configs/folder.py:size=ci', f'--config.data.path={root}', f'--workdir={work}']
    r = _train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for phase in ('tokenizer', 'var'):  # each phase says what it reads, the same folder
        assert f'[{phase}] reads imagefolder {root}: 274 training images, 26 held out' in out
        assert '4 classes (circle, cross, square, triangle); 32 px' in out
    assert 'folder score of' in out and 'chance accuracy is 25.0 %' in out
    assert sorted((work / 'samples').glob('*.png'))  # the labelled grid
    score = json.loads((work / 'eval.json').read_text())
    assert score['eval/classifier_test_acc'] >= 0.9  # the judge, on held-out real images
    assert score['eval/guided_class_acc'] >= 0.6  # chance 25 %
    assert score['eval/fd_guided'] < score['eval/fd_baseline_class_means']
    assert score['settings']['reference'].startswith('held-out (26 images)')
    # again: a finished run resumes at its last step, trains nothing and reprints the stored score
    r2 = _train(args)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert 'already complete' in r2.stdout and 'measured earlier' in r2.stdout
    # the evaluate command prints the same score
    r3 = subprocess.run([sys.executable, '-m', 'var_jax.evaluate', '--workdir', str(work)], capture_output=True,
                        text=True, cwd=REPO, timeout=600)
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert f'{100 * score["eval/guided_class_acc"]:6.1f} %' in r3.stdout


@pytest.mark.slow
def test_finetune_official_fixture_on_new_classes(tmp_path):
    fx = fixture_dir('var_tiny')
    ckpt = tmp_path / 'official'
    vq, var = official.load_official(fx / 'vae_state.npz', fx / 'var_state.npz')
    checkpoint.save_model(ckpt, vqvae=vq, var=var)
    root = make_shapes_folder(tmp_path / 'shapes', per_class=4, size=64)
    work = tmp_path / 'ft'
    r = _train(['--config=configs/folder.py:size=ci,res=256', f'--config.data.path={root}', f'--workdir={work}',
                f'--config.tokenizer.checkpoint={ckpt}', f'--config.init_from={ckpt}', '--config.model.depth=2',
                '--config.model.width=128', '--config.model.num_heads=2', '--config.batch_size=2',
                '--config.total_steps=3', '--config.checkpoint_every=3', '--config.log_every=1',
                '--config.evaluate=False', '--config.sample.per_class=1', "--config.finetune.freeze=('blocks',)"],
               timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'class embedding 1000 -> 4 classes' in r.stdout
    assert sorted((work / 'samples').glob('*.png'))
    _, tuned = checkpoint.load_model(work, need_var=True)
    assert tuned.config.num_classes == 4
    emb = np.asarray(tuned.class_emb.embedding[...])
    old = np.asarray(var.class_emb.embedding[...])
    assert emb.shape == (5, old.shape[1])
    np.testing.assert_array_equal(np.asarray(tuned.blocks.attn.mat_qkv[...]), np.asarray(var.blocks.attn.mat_qkv[...]))
    assert not np.array_equal(np.asarray(tuned.head.kernel[...]), np.asarray(var.head.kernel[...]))


def test_evaluate_cli_picks_the_folder_score(tmp_path, capsys):
    (tmp_path / 'model.json').write_text(json.dumps({'var': {'num_classes': 2}, 'vqvae': {'ch': 16}}))
    (tmp_path / 'config.json').write_text(json.dumps({'data': {'source': 'imagefolder',
                                                               'path': str(tmp_path / 'gone')}}))
    assert evaluate.main(['--workdir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and 'image folder' in err[0] and 'is gone' in err[0]
    assert evaluate.main(['--workdir', str(tmp_path), '--samples', 'x.npz']) == 2
    assert 'not both' in capsys.readouterr().err


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same, shifted = folder_score.kid(a, b, subsets=5, size=200), folder_score.kid(a, b + 0.5, subsets=5, size=200)
    assert abs(same) < 0.05 < shifted
