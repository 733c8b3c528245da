"""VAR training (issue 3): sharded step == one device, exact resume after kill -9, restore on another
mesh, loss falls, corrupt images skipped, bad configs, the d30 dry run, two processes == one, a
signal on one of two processes stops both at the same step.

Models are tiny (16 px built-in images, 3 scales, depth 2, width 64) so compiles stay short.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, no_jit_cache, override, prepare_tiny_tfds
from flax import nnx
from PIL import Image

from var_jax.io import checkpoint
from var_jax.models import VAR, VQVAEConfig, create
from var_jax.training import configs, var_task
from var_jax.utils import metrics

OVERRIDES = dict(total_steps=6, batch_size=16, log_every=1, checkpoint_every=2)


def tiny_config(tokenizer_dir, **kw):
    c = configs.var_recipe(depth=2, batch_size=16, epochs=0, tblr=1e-4, alng=1e-3, wpe=0.1)
    c.update(OVERRIDES)
    c.model.update(width=64, num_heads=1, dtype='float32', drop_path_rate=0.0)
    c.data = configs.data_config(source='builtin', image_size=16, workers=0)
    c.tokenizer.checkpoint = str(tokenizer_dir)
    c.optim.update(lr=3e-3, wp_epochs=0.001)
    c.sample.update(per_class=0)
    return override(c, **kw)


def cli_args(tokenizer_dir, workdir, **kw) -> list[str]:
    """The same tiny run as `tiny_config`, as command-line overrides of configs/tiny.py."""
    args = [f'--config={REPO / "configs" / "tiny.py"}', f'--workdir={workdir}',
            f'--config.tokenizer.checkpoint={tokenizer_dir}', '--config.model.depth=2', '--config.model.width=64',
            '--config.model.num_heads=1', '--config.model.drop_path_rate=0.0', '--config.model.patch_nums=(1,2,4)',
            '--config.model.scan_layers=True', '--config.data.image_size=16', '--config.optim.lr=0.003',
            '--config.optim.wp_epochs=0.001', '--config.optim.wd=0.05', '--config.optim.wd_end=0.05',
            '--config.sample.per_class=0', '--config.evaluate=False', '--config.eval_every=0']
    args += [f'--config.{k}={v}' for k, v in {**OVERRIDES, **kw}.items()]
    return args


def losses(workdir, key='Lm') -> dict[int, float]:
    return {r['step']: r[key] for r in metrics.read_jsonl(workdir) if key in r}


def env8(**extra):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    env.update(extra)
    return env


def test_reduce_steps_means_per_scale_vectors_and_counts():
    fetched = [{'loss': np.float32(2.0), 'acc_scale': np.array([10.0, 20.0]), 'nonfinite': np.int32(0),
                'skipped': np.int32(1)},
               {'loss': np.float32(4.0), 'acc_scale': np.array([30.0, 40.0]), 'nonfinite': np.int32(1),
                'skipped': np.int32(2)}]
    logged, nonfinite, skipped = metrics.reduce_steps(fetched)
    assert (nonfinite, skipped) == (1, 3)
    assert logged == {'loss': 3.0, 'nonfinite': 1, 'skipped': 1.5, 'acc_scale/0': 20.0, 'acc_scale/1': 30.0}
    assert list(logged) == ['loss', 'nonfinite', 'skipped', 'acc_scale/0', 'acc_scale/1'], 'scalars, then vectors'
    assert all(type(v) is float for k, v in logged.items() if k != 'nonfinite')


def test_the_library_imports_no_command_module():
    commands = {'train', 'train_tokenizer', 'sample', 'edit', 'evaluate', 'convert', 'bench', 'pretokenize'}
    pattern = re.compile(r'^\s*(?:from var_jax import ([\w, ]+)|from var_jax\.(\w+) import|import var_jax\.(\w+))',
                         re.MULTILINE)
    library = [f for f in sorted((REPO / 'var_jax').rglob('*.py'))
               if f.parent.name != 'var_jax' or f.stem not in commands]
    assert len(library) > 40
    for f in library:
        for m in pattern.finditer(f.read_text()):
            names = {n.strip() for n in (m[1] or '').split(',')} | {m[2], m[3]}
            assert not names & commands, f'{f.name} imports the command {names & commands}'


@pytest.mark.slow
def test_sharded_step_matches_one_device(tokenizer_dir, tmp_path):
    one = var_task.run(tiny_config(tokenizer_dir, **{'mesh.num_devices': 1, 'total_steps': 3}), tmp_path / 'one')
    sharded = var_task.run(tiny_config(tokenizer_dir, **{'mesh.data': 2, 'mesh.fsdp': 4, 'total_steps': 3}),
                        tmp_path / 'sharded')
    a, b = losses(tmp_path / 'one'), losses(tmp_path / 'sharded')
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)
    assert abs(one['grad_norm'] - sharded['grad_norm']) < 1e-4 * max(1.0, one['grad_norm'])


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(tokenizer_dir, tmp_path):
    cmd = [sys.executable, '-m', 'var_jax.train'] + cli_args(tokenizer_dir, tmp_path / 'run')
    kill = [sys.executable, str(REPO / 'tests' / 'train_killed_after.py'), '3'] + cmd[3:]  # the same run
    killed = subprocess.run(kill, cwd=REPO, env=env8(PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert checkpoint.TrainCheckpointer(tmp_path / 'run', read_only=True).latest_step() == 2
    ckpts = tmp_path / 'run' / checkpoint.CHECKPOINTS
    torn = ckpts / '3.orbax-checkpoint-tmp-1795000000000000'  # what a kill during a save leaves
    shutil.copytree(ckpts / '2', torn)
    resumed = subprocess.run(cmd, cwd=REPO, env=env8(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout and 'at step 2' in resumed.stdout
    assert not torn.exists()
    records = len(metrics.read_jsonl(tmp_path / 'run'))
    again = subprocess.run(cmd, cwd=REPO, env=env8(), capture_output=True, text=True)  # a finished run
    assert again.returncode == 0 and 'already complete at step 6' in again.stdout, again.stderr[-2000:]
    assert len(metrics.read_jsonl(tmp_path / 'run')) == records, 'nothing trained or logged again'
    straight = subprocess.run([sys.executable, '-m', 'var_jax.train'] + cli_args(tokenizer_dir, tmp_path / 'ref'),
                              cwd=REPO, env=env8(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    got, want = metrics.read_jsonl(tmp_path / 'run'), losses(tmp_path / 'ref')
    after = {r['step']: r['Lm'] for r in got[[i for i, r in enumerate(got) if r['step'] == 3][-1]:] if 'Lm' in r}
    assert sorted(after) == [3, 4, 5, 6]
    np.testing.assert_array_equal([after[s] for s in after], [want[s] for s in after])


@pytest.mark.slow
def test_restore_on_another_mesh(tokenizer_dir, tmp_path):
    w = tmp_path / 'w'
    var_task.run(tiny_config(tokenizer_dir, **{'mesh.data': 2, 'mesh.fsdp': 4, 'total_steps': 2}), w)
    saved = checkpoint.TrainCheckpointer(w, read_only=True)
    assert saved.latest_step() == 2
    _, var = checkpoint.load_model(w)  # 8-device checkpoint -> one device
    leaf = jax.tree.leaves(nnx.state(var, nnx.Param))[0]
    assert len(leaf.sharding.device_set) == 1
    # the full training state (optimizer included) continues on a 1-device mesh
    out = var_task.run(tiny_config(tokenizer_dir, **{'mesh.num_devices': 1, 'total_steps': 4}), w)
    assert np.isfinite(out['Lm']) and sorted(losses(w)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_loss_falls(tokenizer_dir, tmp_path):
    var_task.run(tiny_config(tokenizer_dir, **{'total_steps': 40, 'log_every': 5, 'checkpoint_every': 40}),
              tmp_path / 'w')
    lm = losses(tmp_path / 'w')
    assert lm[40] < lm[1] - 0.5, lm


@pytest.mark.slow
def test_ema_weights_are_what_inference_loads(tokenizer_dir, tmp_path):
    # optim.ema is off in the official recipe; on, it must not change training, only what is exported
    kw = {'total_steps': 3, 'checkpoint_every': 3}
    var_task.run(tiny_config(tokenizer_dir, **kw), tmp_path / 'plain')
    var_task.run(tiny_config(tokenizer_dir, **kw, **{'optim.ema': 0.999999}), tmp_path / 'ema')
    assert losses(tmp_path / 'plain') == losses(tmp_path / 'ema')
    plain = nnx.state(checkpoint.load_model(tmp_path / 'plain')[1], nnx.Param)
    ema_var = checkpoint.load_model(tmp_path / 'ema')[1]
    ema = nnx.state(ema_var, nnx.Param)
    init = nnx.state(VAR(ema_var.config, rngs=nnx.Rngs(jax.random.key(0))), nnx.Param)  # trainer's init, seed 0
    head = lambda st: np.asarray(st['head']['kernel'][...])  # noqa: E731
    assert np.abs(head(plain) - head(init)).max() > 1e-3, 'three AdamW steps move the raw weights'
    np.testing.assert_allclose(head(ema), head(init), atol=1e-5)  # decay ~1: the EMA is still the init


@pytest.mark.parametrize('layout', ['classes', 'flat', 'tfds'])
@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted(tmp_path, layout, capsys):
    """Each image source with unreadable records: an image folder with class subfolders, a flat
    one (one class), and a prepared TFDS dataset read as array_record without TensorFlow."""
    root = tmp_path / 'images'
    rng = np.random.default_rng(0)
    if layout == 'tfds':
        data = configs.data_config(source='tfds', name='var_jax_tiny', data_dir=str(prepare_tiny_tfds(root)),
                                      image_size=16, workers=0)
    else:
        for c in ('a', 'b'):
            (root / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / c / f'{i}.png')
        (root / 'a' / '3.png').write_bytes(b'not an image')
        (root / 'b' / '0.png').write_bytes(b'')
        if layout == 'flat':
            for f in sorted(root.glob('*/*.png')):
                f.rename(root / f'{f.parent.name}{f.name}')
            for c in ('a', 'b'):
                (root / c).rmdir()
        data = configs.data_config(source='imagefolder', path=str(root), image_size=16, workers=0)
    tok = VQVAEConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8,
                      using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 4))
    checkpoint.save_model(tmp_path / 'tok', vqvae=create(tok, seed=1))
    c = tiny_config(tmp_path / 'tok', **{'total_steps': 3, 'batch_size': 8})
    c.data = data
    out = var_task.run(c, tmp_path / 'w')
    assert out['data_skipped_total'] >= 1 and np.isfinite(out['Lm'])
    said = [line for line in capsys.readouterr().out.splitlines() if 'unreadable' in line]
    assert said and f'{int(out["data_skipped_total"])} so far' in said[-1], 'skips are reported on the console too'
    vq, var = checkpoint.load_model(tmp_path / 'w', need_var=True)
    assert var.config.num_classes == {'classes': 2, 'flat': 1, 'tfds': 3}[layout]
    vq_only, none = checkpoint.load_model(tmp_path / 'w', tokenizer_only=True)  # from beside the VAR checkpoints
    assert none is None
    jax.tree.map(np.testing.assert_array_equal, nnx.state(vq_only, nnx.Param), nnx.state(vq, nnx.Param))


@pytest.mark.parametrize('override,match', [
    ('--config.batch_size=0', 'batch_size must be >= 1'),
    ('--config.data.source=nope', 'data.source must be one of'),
    ('--config.mesh.data=3', 'mesh data=3'),
    # slow: the built-in data is rendered at 300 px before the tokenizer's 16 px is compared (140 s)
    pytest.param('--config.data.image_size=300', 'data.image_size is 300', marks=pytest.mark.slow),
    ('--config.optim.ema=1.0', 'optim.ema must be in [0, 1)'),
])
def test_bad_config_is_one_line(tokenizer_dir, tmp_path, override, match):
    args = cli_args(tokenizer_dir, tmp_path / 'w')
    if 'image_size' in override:
        args = [a for a in args if 'patch_nums' not in a] + ['--config.model.patch_nums=()']
    r = subprocess.run([sys.executable, '-m', 'var_jax.train'] + args + [override], cwd=REPO, env=env8(),
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith('error:') and match in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_d30_dry_run_on_8_devices_with_fsdp(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'var_jax.train', f'--config={REPO / "configs" / "d30.py"}',
                        f'--workdir={tmp_path / "w"}', '--dry_run', '--config.batch_size=16',
                        '--config.model.remat=block'],
                       cwd=REPO, env=env8(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'fsdp': 8" in r.stdout and 'per-device memory' in r.stdout
    assert not (tmp_path / 'w' / 'checkpoints').exists(), 'a dry run allocates and writes nothing'


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(tokenizer_dir, tmp_path):
    args = cli_args(tokenizer_dir, tmp_path / 'multi', total_steps=3)[2:]  # the script adds config/workdir
    r = subprocess.run(['bash', str(REPO / 'launch' / 'local_multiprocess.sh'), '2'] + args, cwd=REPO,
                       env=dict(no_jit_cache(os.environ), DEVICES_PER_PROCESS='4', WORKDIR=str(tmp_path / 'multi'),
                                CONFIG=str(REPO / 'configs' / 'tiny.py'), PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f'{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    single = subprocess.run([sys.executable, '-m', 'var_jax.train'] + cli_args(tokenizer_dir, tmp_path / 'single',
                                                                               total_steps=3),
                            cwd=REPO, env=env8(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = losses(tmp_path / 'multi'), losses(tmp_path / 'single')
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)
    assert json.loads((tmp_path / 'multi' / 'model.json').read_text())['var']['depth'] == 2


@pytest.mark.slow
def test_a_signal_on_one_process_stops_every_process_at_the_same_step(tokenizer_dir, tmp_path):
    """SIGTERM reaching one rank only (a node preempted first, a stray kill): every rank stops
    after the same step, the checkpoint is written once, and all exit 75 (stopped, resumable). A rank that saved alone
    would wait forever in the save's collectives for the others, which trained on."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        coordinator = f'127.0.0.1:{sock.getsockname()[1]}'
    w = tmp_path / 'w'
    args = cli_args(tokenizer_dir, w, total_steps=100_000, log_every=4, checkpoint_every=100_000)
    procs = []
    try:
        for rank in range(2):
            env = dict(no_jit_cache(os.environ), JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=coordinator,
                       JAX_COORDINATOR_BIND_ADDRESS=coordinator, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(rank),
                       XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONUNBUFFERED='1')
            procs.append(subprocess.Popen([sys.executable, '-m', 'var_jax.train'] + args, cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 600
        while not (w / 'metrics.jsonl').exists() or max(losses(w), default=0) < 9:  # training, past a sync
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), 'the ranks did not train'
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], '\n'.join(o[-2000:] for o in outs)  # trainer.EXIT_STOPPED
    stopped = [re.findall(r'stopped by signal at step (\d+)', o) for o in outs]
    assert len(stopped[0]) == len(stopped[1]) == 1 and stopped[0] == stopped[1], stopped
    step = int(stopped[0][0])
    assert step % 4 == 0 and checkpoint.TrainCheckpointer(w, read_only=True).latest_step() == step
