"""What a training run can rely on (issues 18/19, docs/reliability.md): a damaged newest checkpoint
falls back to an intact step (and sample names it), a changed tokenizer is an error, one run per
workdir (a lock a killed run does not leave stuck), the exit code of a stop by signal, a notice when
a run resumes with another batch size, the dry run of the default config and its "what fits" hints.

One tiny VAR workdir (steps 2 and 4) is trained once per module and copied by each test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TOK
from test_train import cli_args, env8, losses, tiny_config

from var_jax.io import checkpoint
from var_jax.models import create
from var_jax.training import configs, loop, var_task


@pytest.fixture(scope='module')
def trained(tokenizer_dir, tmp_path_factory):  # noqa: F811
    w = tmp_path_factory.mktemp('base') / 'w'
    var_task.run(tiny_config(tokenizer_dir, total_steps=4), w)
    assert sorted(checkpoint.TrainCheckpointer(w, read_only=True).mngr.all_steps()) == [2, 4]
    return w


def copy_of(trained, tmp_path):
    w = tmp_path / 'w'
    shutil.copytree(trained, w)
    return w


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------- 19.2 damaged newest step
def damage(w, step: int, how: str):
    d = w / checkpoint.CHECKPOINTS / str(step) / 'params'
    if how == 'truncate':  # the largest array chunk, cut in half (a copy or write cut short)
        f = max((p for p in d.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:  # one flipped bit in the item's metadata
        f = d / '_METADATA'
        b = bytearray(f.read_bytes())
        b[len(b) // 3] ^= 0x40
        f.write_bytes(bytes(b))


@pytest.mark.parametrize('how', ['truncate', 'bitflip'])
@pytest.mark.slow
def test_a_damaged_newest_step_falls_back_to_the_intact_one(tokenizer_dir, trained, tmp_path, how):  # noqa: F811
    w = copy_of(trained, tmp_path)
    damage(w, 4, how)
    # sample / evaluate: one line naming the damaged step and the intact one
    r = subprocess.run([sys.executable, '-m', 'var_jax.sample', '--checkpoint', str(w), '--classes', '1',
                        '--out', str(tmp_path / 'g.png')], cwd=REPO, env=env8(), capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-3000:]
    err = one_line(r.stderr)
    assert err.startswith('error:') and 'step 4 is damaged' in err and 'intact steps: 2' in err, err
    assert not (tmp_path / 'g.png').exists()
    # training: resumes from step 2 with one warning line, keeps the damaged step aside, goes on
    r = subprocess.run([sys.executable, '-m', 'var_jax.train'] + cli_args(tokenizer_dir, w, total_steps=6),
                       cwd=REPO, env=env8(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    warn = [ln for ln in (r.stdout + r.stderr).splitlines() if 'is damaged' in ln or ln.startswith('warning')]
    assert len(warn) == 1 and warn[0].startswith('warning: checkpoint step 4 is damaged'), r.stdout + r.stderr
    assert 'resuming from step 2' in warn[0] and 'Traceback' not in r.stderr
    assert 'resumed from' in r.stdout and 'at step 2' in r.stdout
    kept = list((w / loop.DAMAGED).iterdir())
    assert len(kept) == 1 and kept[0].name.startswith('step-4-'), kept
    assert sorted(checkpoint.TrainCheckpointer(w, read_only=True).mngr.all_steps()) == [2, 4, 6]
    assert sorted(s for s in losses(w) if s > 2) == [3, 4, 5, 6]


@pytest.mark.slow
def test_a_config_mismatch_is_not_taken_for_damage(tokenizer_dir, trained, tmp_path):  # noqa: F811
    w = copy_of(trained, tmp_path)
    with pytest.raises(ValueError, match='cannot restore step 4'):
        var_task.run(tiny_config(tokenizer_dir, total_steps=6, **{'model.width': 128}), w)
    assert not (w / loop.DAMAGED).exists(), 'nothing is moved aside when no older step restores either'
    assert sorted(checkpoint.TrainCheckpointer(w, read_only=True).mngr.all_steps()) == [2, 4]


# ---------------------------------------------------------------------------- 19.3 tokenizer changes
@pytest.mark.slow
def test_another_tokenizer_on_a_rerun_is_an_error(trained, tmp_path):
    w = copy_of(trained, tmp_path)
    other = tmp_path / 'other_tok'
    checkpoint.save_model(other, vqvae=create(TOK, seed=4))
    with pytest.raises(ValueError, match='tokenizer') as e:
        var_task.run(tiny_config(other, total_steps=6), w)
    assert str(other) in str(e.value) and 'copy of' in str(e.value)
    # asking to train one where the workdir holds a copy is the same mistake
    c = tiny_config(other, total_steps=6, **{'tokenizer.checkpoint': ''})
    c.tokenizer.train = configs.tokenizer_tiny()
    c.tokenizer.allow_other_data = True  # its 32 px built-in data vs VAR's 16 px: not what is tested here
    with pytest.raises(ValueError, match='copy of'):
        var_task.run(c, w)


@pytest.mark.slow
def test_retraining_the_tokenizer_under_a_trained_var_is_an_error(trained, tmp_path):
    w = copy_of(trained, tmp_path)
    tok = configs.tokenizer_tiny()
    tok.total_steps = 600
    # the workdir as a chained run leaves it: a tokenizer trained here (its config.json) under VAR steps
    local = w / var_task.TOKENIZER_DIR
    shutil.rmtree(local)
    (local / checkpoint.CHECKPOINTS).mkdir(parents=True)
    checkpoint.write_model_json(local, vqvae=TOK, var=None)
    (local / 'config.json').write_text(tok.to_json_best_effort())
    c = tiny_config(w, total_steps=6, **{'tokenizer.checkpoint': ''})
    c.tokenizer.train = configs.tokenizer_tiny()
    c.tokenizer.allow_other_data = True  # its 32 px built-in data vs VAR's 16 px: not what is tested here
    c.tokenizer.train.total_steps = 800
    with pytest.raises(ValueError, match=r'total_steps 600 -> 800'):
        var_task.run(c, w)


# ---------------------------------------------------------------------------- 19.4 one run per workdir
HOLDER = '''
import sys, time
from var_jax.training import loop
with loop.workdir_lock(sys.argv[1]):
    print('holding', flush=True)
    time.sleep(600)
'''


@pytest.mark.slow
def test_a_second_run_on_the_same_workdir_is_refused(tokenizer_dir, trained, tmp_path):  # noqa: F811
    w = copy_of(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(w)], cwd=REPO, env=env8(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == 'holding'
        r = subprocess.run([sys.executable, '-m', 'var_jax.train'] + cli_args(tokenizer_dir, w, total_steps=4),
                           cwd=REPO, env=env8(), capture_output=True, text=True)
        assert r.returncode == 2, r.stderr[-3000:]
        err = one_line(r.stderr)
        assert err.startswith('error:') and 'in use by another run' in err and f'pid {holder.pid}' in err, err
        holder.send_signal(signal.SIGKILL)  # a killed run leaves no stuck lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    r = subprocess.run([sys.executable, '-m', 'var_jax.train'] + cli_args(tokenizer_dir, w, total_steps=4),
                       cwd=REPO, env=env8(), capture_output=True, text=True)
    assert r.returncode == 0 and 'already complete at step 4' in r.stdout, r.stderr[-3000:]


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    with loop.workdir_lock(tmp_path):
        with loop.workdir_lock(tmp_path):  # train.run holds it around the tokenizer and VAR phases
            pass
        info = json.loads((tmp_path / loop.LOCK_FILE).read_text())
        assert info['pid'] == os.getpid() and info['host']
    with loop.workdir_lock(tmp_path):
        pass


# ---------------------------------------------------------------------------- 19.7 stop, batch size, dry run
@pytest.mark.slow
def test_a_signal_stop_exits_with_the_requeue_code(tokenizer_dir, tmp_path):  # noqa: F811
    w = tmp_path / 'w'
    p = subprocess.Popen([sys.executable, '-m', 'var_jax.train']
                         + cli_args(tokenizer_dir, w, total_steps=100_000, checkpoint_every=100_000),
                         cwd=REPO, env=env8(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while max(losses(w), default=0) < 2 if (w / 'metrics.jsonl').exists() else True:
            assert time.monotonic() < deadline and p.poll() is None, 'did not train'
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == loop.EXIT_STOPPED == 75, err[-3000:]
    assert 'stopped by signal at step' in out
    assert checkpoint.TrainCheckpointer(w, read_only=True).latest_step() is not None


@pytest.mark.slow
def test_resuming_with_another_batch_size_says_so(tokenizer_dir, trained, tmp_path, capsys):  # noqa: F811
    w = copy_of(trained, tmp_path)
    var_task.run(tiny_config(tokenizer_dir, total_steps=6, batch_size=8), w)
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if 'batch_size' in ln]
    assert len(notes) == 1 and 'batch_size 8' in notes[0] and '16' in notes[0], out
    assert 'total_steps 6' in notes[0] and '4' in notes[0]


@pytest.mark.slow
def test_dry_run_of_the_default_config(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'var_jax.train', f'--config={REPO / "configs" / "tiny.py"}',
                        f'--workdir={tmp_path / "w"}', '--dry_run'], cwd=REPO, env=env8(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'per-device memory' in r.stdout
    assert not (tmp_path / 'w' / 'tokenizer').exists(), 'a dry run trains and writes nothing'


@pytest.mark.slow
def test_dry_run_says_what_fits(tokenizer_dir, tmp_path):  # noqa: F811
    c = tiny_config(tokenizer_dir, batch_size=64, **{'model.scan_layers': True})
    base = var_task.run(c, tmp_path / 'w', dry_run=True)
    need = base['bytes_per_device']
    # a device a little smaller than the recipe needs: some setting must bring it under
    out = var_task.run(c, tmp_path / 'w', dry_run=True, device_memory_gib=0.9 * need / 2 ** 30)
    assert out['fits'] is False
    fit = out['suggestion']
    assert fit is not None and fit['bytes_per_device'] <= 0.9 * need, out
    assert any(a.startswith(('--config.grad_accum=', '--config.model.remat=', '--config.mesh.')) for a in fit['args'])
