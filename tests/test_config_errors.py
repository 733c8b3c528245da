"""Ordinary mistakes on the trainers' command line (issue 19.6): one `error:` line, exit code 2, no
traceback, and no workdir left behind by a run that failed on its config or data.

Also the typed preset parser `configs.parse_arg` the configs use (`configs/d16.py:runlocal`).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import REPO

from var_jax.io import checkpoint
from var_jax.models import PATCH_NUMS, VARConfig, VQVAEConfig, create
from var_jax.training import configs

TOK = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8,
                  using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 4))
CONFIGS = REPO / 'configs'


# ---------------------------------------------------------------------------- parse_arg
def test_parse_arg_types_and_defaults():
    a = configs.parse_arg('runlocal,res=128,name=x,lr=0.5', runlocal=False, res=256, name='y', lr=1.0, big=True)
    assert (a.runlocal, a.res, a.name, a.lr, a.big) == (True, 128, 'x', 0.5, True)
    assert isinstance(a.res, int) and isinstance(a.lr, float)
    b = configs.parse_arg(None, runlocal=False, res=256)
    assert (b.runlocal, b.res) == (False, 256)
    assert configs.parse_arg('', ci=False).ci is False
    assert configs.parse_arg('ci=false', ci=True).ci is False
    assert configs.parse_arg('n=3', n=(None, int)).n == 3  # (default, converter)
    lazy = configs.parse_arg('runlocal,extra=3,word=abc', lazy=True, runlocal=False)
    assert (lazy.runlocal, lazy.extra, lazy.word) == (True, 3, 'abc')


@pytest.mark.parametrize('arg, match', [
    ('bogus', "unknown config argument 'bogus' .*known: res, runlocal"),
    ('runlocal,bogus=1', "unknown config argument 'bogus'"),
    ('res=big', "config argument res=big: expected int"),
    ('runlocal=maybe', 'config argument runlocal=maybe: expected a bool'),
    ('res', 'config argument res needs a value'),
])
def test_parse_arg_rejects_unknown_and_bad_values(arg, match):
    with pytest.raises(ValueError, match=match):
        configs.parse_arg(arg, runlocal=False, res=256)


@pytest.mark.parametrize('name, arg', [('d16', 'runlocal'), ('tiny', 'ci'), ('tokenizer', 'runlocal'),
                                       ('tokenizer_tiny', 'runlocal'), ('d36', '')])
def test_every_config_rejects_an_unknown_preset(name, arg):
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(f'cfg_{name}', CONFIGS / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.get_config(arg or None) is not None
    with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
        mod.get_config('bogus')


def test_presets_still_apply():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location('cfg_d16', CONFIGS / 'd16.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.get_config('runlocal').batch_size == 8 and mod.get_config().batch_size == 768


# ---------------------------------------------------------------------------- config.model: the dataclass fields
def small_var():
    return configs.var_recipe(depth=2, batch_size=8, epochs=1, tblr=1e-4, alng=1e-3, wpe=0.1)


def test_model_keys_are_the_dataclass_fields():
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    c = small_var()
    assert set(c.model) == names(VARConfig) - {'vocab_size', 'cvae'}, 'every field but the tokenizer\'s two'
    assert (c.model.init_adaln, c.model.init_adaln_gamma) == (0.5, 1e-3), 'the official aln, alng'
    assert set(configs.tokenizer_recipe().model) == names(VQVAEConfig)
    assert configs.vqvae_model_config(configs.tokenizer_recipe().model) == VQVAEConfig(), 'the official tokenizer'


def test_var_model_config_fills_what_comes_from_the_tokenizer_and_the_data():
    c = small_var()
    c.model.update(width=64, num_heads=1, init_adaln_gamma=1e-4, mlp_ratio=2.0, norm_eps=1e-5)
    var = configs.var_model_config(c.model, TOK, 7)
    assert (var.vocab_size, var.cvae, var.patch_nums, var.num_classes) == (64, 8, (1, 2, 4), 7)
    assert (var.init_adaln_gamma, var.mlp_ratio, var.norm_eps, var.width) == (1e-4, 2.0, 1e-5, 64)
    c.model.update(num_classes=3, patch_nums=(1, 2, 4))
    assert configs.var_model_config(c.model, TOK, 7).num_classes == 3
    c.model.patch_nums = (1, 2, 3)
    with pytest.raises(ValueError, match=r"model.patch_nums \(1, 2, 3\) differs from the tokenizer's \(1, 2, 4\)"):
        configs.var_model_config(c.model, TOK, 7)


@pytest.mark.parametrize('kind, old', [('var', 'alng'), ('var', 'aln'), ('var', 'pn'), ('tokenizer', 'pn')])
def test_a_key_the_dataclass_does_not_know_is_named(kind, old):
    c = small_var() if kind == 'var' else configs.tokenizer_tiny()
    model = {**c.model.to_dict(), old: 1}
    cls = 'VARConfig' if kind == 'var' else 'VQVAEConfig'
    known = r'\(known: .*init_adaln_gamma' if kind == 'var' else r'\(known: .*z_channels\)$'
    with pytest.raises(ValueError, match=rf'^config.model.{old} is not a {cls} field {known}'):
        if kind == 'var':
            configs.var_model_config(model, TOK, 10)
        else:
            configs.vqvae_model_config(model)
    with c.unlocked():
        c.model[old] = 1
    with pytest.raises(ValueError, match=rf'^config: model.{old} is not a {cls} field'):
        configs.check(c, kind)


def test_the_scales_without_a_tokenizer_come_from_the_image_size():
    c = configs.var_recipe(depth=36, batch_size=8, epochs=1, tblr=1e-4, alng=1e-3, wpe=0.1, image_size=512)
    assert configs.patch_nums_of(c) == PATCH_NUMS[512] and c.data.image_size == 512
    c.data.image_size = 32
    with pytest.raises(ValueError, match='config.data.image_size 32 has no official patch_nums'):
        configs.patch_nums_of(c)
    c.model.patch_nums = (1, 2, 4)
    assert configs.patch_nums_of(c) == (1, 2, 4)
    configs.check(c, 'var')  # a VAR's scales are its tokenizer's: any image size passes the config check


def test_a_tokenizer_names_its_scales():
    c = configs.tokenizer_tiny()
    c.model.patch_nums = ()
    with pytest.raises(ValueError, match=r'config: model.patch_nums must name the scales'):
        configs.check(c, 'tokenizer')


# ---------------------------------------------------------------------------- the command line
@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('tok') / 'ckpt'
    checkpoint.save_model(d, vqvae=create(TOK, seed=3))
    return d


def _env():
    return dict(os.environ, JAX_PLATFORMS='cpu')


def run_cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, '-m', f'var_jax.{module}', *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(r, match: str):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    assert match in lines[0], lines[0]


def tiny_var_args(tokenizer_dir, workdir):
    """configs/tiny.py with a given tokenizer (no tokenizer training), tiny and short."""
    return [f'--config={CONFIGS / "tiny.py"}', f'--workdir={workdir}', f'--config.tokenizer.checkpoint={tokenizer_dir}',
            '--config.model.depth=1', '--config.model.width=32', '--config.model.num_heads=1',
            '--config.model.patch_nums=(1,2,4)', '--config.data.image_size=16', '--config.total_steps=2',
            '--config.sample.per_class=0', '--config.evaluate=False']


@pytest.mark.parametrize('module, config', [('train', 'tiny.py'), ('train_tokenizer', 'tokenizer_tiny.py')])
def test_unknown_config_field(tmp_path, module, config):
    w = tmp_path / 'w'
    r = run_cli(module, f'--config={CONFIGS / config}', f'--workdir={w}', '--config.bogus=3')
    one_error_line(r, '--config.bogus')
    assert not w.exists()
    r = run_cli(module, f'--config={CONFIGS / config}', f'--workdir={w}', '--config.data.sorce=3')
    one_error_line(r, '--config.data.sorce')
    assert 'source' in r.stderr, 'the close field is suggested'
    assert not w.exists()


def test_bad_override_value_and_unknown_flag(tmp_path):
    w = tmp_path / 'w'
    one_error_line(run_cli('train', f'--config={CONFIGS / "tiny.py"}', f'--workdir={w}', '--config.batch_size=abc'),
                   'batch_size')
    one_error_line(run_cli('train', f'--config={CONFIGS / "tiny.py"}', f'--workdir={w}', '--bogus_flag=1'),
                   'bogus_flag')
    one_error_line(run_cli('train', f'--config={CONFIGS / "tiny.py"}'), 'workdir')
    assert not w.exists()


@pytest.mark.parametrize('module', ['train', 'train_tokenizer'])
def test_missing_config_file(tmp_path, module):
    w = tmp_path / 'w'
    r = run_cli(module, f'--config={tmp_path / "nope.py"}', f'--workdir={w}')
    one_error_line(r, f'config file {tmp_path / "nope.py"} does not exist')
    assert not w.exists()


@pytest.mark.parametrize('module, config', [('train', 'tiny.py'), ('train_tokenizer', 'tokenizer_tiny.py')])
def test_unknown_preset(tmp_path, module, config):
    w = tmp_path / 'w'
    r = run_cli(module, f'--config={CONFIGS / config}:bogus', f'--workdir={w}')
    one_error_line(r, "unknown config argument 'bogus'")
    assert not w.exists()


@pytest.mark.parametrize('module, config', [('train', 'tiny.py'), ('train_tokenizer', 'tokenizer_tiny.py:runlocal')])
def test_workdir_is_a_file(tmp_path, module, config):
    f = tmp_path / 'afile'
    f.write_text('mine')
    r = run_cli(module, f'--config={CONFIGS / config}', f'--workdir={f}')
    one_error_line(r, 'is a file')
    assert f.read_text() == 'mine'
    r = run_cli(module, f'--config={CONFIGS / config}', f'--workdir={f / "sub"}')
    one_error_line(r, 'is a file')


@pytest.mark.slow
def test_data_error_before_the_tokenizer_is_trained(tmp_path):
    """configs/tiny.py trains a tokenizer first; a wrong VAR data path must stop the run before that."""
    w = tmp_path / 'w'
    r = run_cli('train', f'--config={CONFIGS / "tiny.py"}', f'--workdir={w}', '--config.data.source=imagefolder',
                f'--config.data.path={tmp_path / "missing"}', '--config.tokenizer.train.total_steps=2')
    one_error_line(r, 'does not exist')
    assert not w.exists()
    # and the same for the tokenizer's own data
    r = run_cli('train', f'--config={CONFIGS / "tiny.py"}', f'--workdir={w}',
                '--config.tokenizer.train.data.source=imagefolder',
                f'--config.tokenizer.train.data.path={tmp_path / "missing"}')
    one_error_line(r, 'does not exist')
    assert not w.exists()


@pytest.mark.slow
def test_late_config_error_removes_only_a_workdir_this_run_made(tokenizer_dir, tmp_path):
    """mesh.data=3 fails when the mesh is made, after the tokenizer copy was written to the workdir."""
    w = tmp_path / 'w'
    r = run_cli('train', *tiny_var_args(tokenizer_dir, w), '--config.mesh.data=3')
    one_error_line(r, 'mesh')
    assert not w.exists(), sorted(p.name for p in w.rglob('*'))
    # a workdir that existed (holding the user's files) is never removed
    w.mkdir()
    (w / 'notes.txt').write_text('mine')
    r = run_cli('train', *tiny_var_args(tokenizer_dir, w), '--config.mesh.data=3')
    one_error_line(r, 'mesh')
    assert (w / 'notes.txt').read_text() == 'mine'


def test_guard_keeps_training_state_and_other_errors(tmp_path):
    def fail(w, exc, *files):
        with pytest.raises(type(exc)), configs.fresh_workdir_guard(w):
            for f in files:
                (w / f).parent.mkdir(parents=True, exist_ok=True)
                (w / f).write_text('x')
            raise exc

    fail(tmp_path / 'a', ValueError('config'), 'model.json', 'tokenizer/model.json')
    assert not (tmp_path / 'a').exists(), 'made by this run, nothing trained: removed'
    fail(tmp_path / 'b', ValueError('data'), 'tokenizer/checkpoints/400/x')
    assert (tmp_path / 'b' / 'tokenizer' / 'checkpoints').exists(), 'a trained tokenizer is kept'
    fail(tmp_path / 'c', FileNotFoundError('f'), 'metrics.jsonl')
    assert (tmp_path / 'c' / 'metrics.jsonl').exists(), 'a run that logged steps is kept'
    fail(tmp_path / 'd', RuntimeError('bug'), 'model.json')
    assert (tmp_path / 'd' / 'model.json').exists(), 'only config/data errors clean up'
