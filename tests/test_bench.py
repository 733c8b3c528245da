"""`python -m var_jax.bench`: each workload runs and prints its table; bad arguments are one line.

Speed itself is not asserted (benchmarks, not timed tests): docs/benchmarks.md has the numbers.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time

import pytest
from conftest import REPO

from var_jax import bench
from var_jax.benchmarks import compare, device


def _table(out: str) -> list[list[str]]:
    heads = ('| batch', '| workload', '| check')
    rows = [line for line in out.splitlines() if line.startswith('| ') and not line.startswith(heads)]
    return [[c.strip() for c in r.strip('|').split('|')] for r in rows]


@pytest.mark.slow
def test_train_step_against_the_autodiff_norm_baseline(capsys):
    rc = bench.main(['train', '--config', str(REPO / 'configs' / 'tiny.py') + ':ci', '--batch', '2',
                     '--warmup', '1', '--repeats', '2', '--baseline', 'autodiff_norm', '--profile', '4'])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'VAR depth 2 width 128, 130 tokens' in out and '(1 of ' in out
    head, _, profile = out.partition('# profile of one step at batch 2: ')
    assert 'the 4 slowest' in profile
    ops = [r for r in _table(profile) if r[0] != 'op']
    assert len(ops) == 4 and all(float(r[1]) > 0 and r[2].endswith('%') and int(r[3]) >= 1 for r in ops)
    (row,) = _table(head)
    batch, ms, img_s, base_ms, ratio = row
    assert batch == '2' and float(ms) > 0 and float(base_ms) > 0
    assert float(img_s) == pytest.approx(2 / (float(ms) / 1e3), rel=0.02)
    assert re.fullmatch(r'\d+\.\d\dx', ratio)


@pytest.mark.slow
def test_train_step_of_a_tokenizer_config(capsys):
    rc = bench.main(['train', '--config', str(REPO / 'configs' / 'tokenizer_tiny.py'), '--batch', '2',
                     '--warmup', '1', '--repeats', '1'])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'tokenizer ch 16 x (1, 2, 2), V 128, 32 px, 6 scales, loss l2 1' in out
    (row,) = _table(out)
    assert row[0] == '2' and float(row[1]) > 0 and float(row[2]) > 0


def test_sample_tiny(capsys):
    rc = bench.main(['sample', '--model', 'tiny', '--batch', '2', '--repeats', '1'])
    out = capsys.readouterr().out
    assert rc == 0, out
    (row,) = _table(out)
    assert row[0] == '2' and all(float(c.replace(',', '')) > 0 for c in row[1:6])


@pytest.mark.parametrize('argv,match', [
    (['train', '--config', 'configs/nope.py'], 'no such file configs/nope.py'),
    (['train', '--config', 'configs/tiny.py', '--batch', '0'], '--batch must be positive'),
    (['train', '--config', 'configs/tiny.py', '--repeats', '0'], '--warmup and --repeats must be >= 1'),
    (['sample', '--model', 'tiny', '--batch', 'x'], '--batch must be comma-separated integers'),
    (['train', '--config', 'configs/tokenizer_tiny.py', '--baseline', 'autodiff_norm'], 'a tokenizer config has none'),
])
def test_bad_arguments_are_one_line(argv, match, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and match in err and '\n' not in err


def test_train_step_attention_against_xla(capsys):
    """--attention sets the timed step's model.attention; --baseline xla_attention times 'xla' beside it."""
    rc = bench.main(['train', '--config', str(REPO / 'configs' / 'tiny.py') + ':ci', '--batch', '2', '--warmup', '1',
                     '--repeats', '1', '--attention', 'blockwise', '--baseline', 'xla_attention'])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'baseline (xla_attention) ms' in out
    (row,) = _table(out)
    assert float(row[1]) > 0 and float(row[3]) > 0 and re.fullmatch(r'\d+\.\d\dx', row[4])
    assert bench.main(['train', '--config', str(REPO / 'configs' / 'tokenizer_tiny.py'), '--attention', 'jax']) == 2
    assert 'a tokenizer config has none' in capsys.readouterr().err


# --- compare: var_jax against the official PyTorch code ----------------------------------------

OFFICIAL = pathlib.Path(os.environ.get('VAR_JAX_OFFICIAL', REPO.parent / 'official'))


def _fake_checkout(tmp_path):
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / '__init__.py').write_text('')
    (tmp_path / 'models' / 'var.py').write_text('')
    return tmp_path


@pytest.mark.parametrize('case,match', [
    ('missing', 'no such directory'),
    ('no_models', 'no models/ package of FoundationVision/VAR there'),
    ('no_torch', 'compare needs PyTorch'),
    ('workloads', '--workloads: unknown fly'),
    ('json_dir', 'its directory does not exist'),
])
def test_compare_errors_are_one_line(case, match, tmp_path, capsys, monkeypatch):
    argv = ['compare', '--official', str(tmp_path / 'nope')]
    if case == 'no_models':
        argv[2] = str(tmp_path)
    elif case == 'no_torch':
        argv[2] = str(_fake_checkout(tmp_path))
        monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
    elif case == 'workloads':
        argv += ['--workloads', 'train,fly']
    elif case == 'json_dir':
        argv += ['--json', str(tmp_path / 'no' / 'x.json')]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and match in err and '\n' not in err, err


class _FakeSide:
    """A side whose workloads take fixed times; every call is logged to check the interleaving."""

    def __init__(self, name, seconds, log, fail=(), skip=()):
        self.name, self.seconds, self.log, self.fail, self.skip = name, seconds, log, fail, skip
        self.released = 0

    def prepare(self, w):
        if w in self.skip:
            raise compare.NotComparable('no such model here')

        def run():
            if w in self.fail:
                raise RuntimeError('out of memory\nsecond line')
            self.log.append((self.name, w))
            time.sleep(self.seconds)
        return run

    def release(self):
        self.released += 1


def test_interleaving_table_and_json_with_fake_sides(tmp_path):
    log = []
    fast = _FakeSide('var_jax', 0.01, log, skip=('encode',))
    slow = _FakeSide('official', 0.03, log, fail=('decode',))
    rs = compare.interleaved([fast, slow], ['train', 'encode', 'decode'], warmup=1, repeats=3, log=lambda m: None)
    # warm-ups first, then timed runs alternate side by side
    assert log[:8] == [('var_jax', 'train'), ('official', 'train')] * 4
    assert [r.workload for r in rs] == ['train', 'encode', 'decode'] and fast.released == slow.released == 3
    train, encode, decode = rs
    assert len(train.times['var_jax']) == len(train.times['official']) == 3
    assert train.ratio('var_jax', 'official') == pytest.approx(3, rel=0.5)
    assert encode.note == 'not comparable: no such model here' and not encode.failed
    assert decode.failed and decode.note == 'failed: RuntimeError: out of memory second line'
    rows = _table(compare.table(rs, 'var_jax', 'official', batch=4))
    assert rows[0][0] == 'train' and re.fullmatch(r'\d+\.\d\dx', rows[0][5])
    assert float(rows[0][3]) == pytest.approx(4 / float(rows[0][1]), rel=0.05)  # img/s = batch / s
    assert rows[1][:2] == ['encode', 'not comparable: no such model here'] and rows[2][1].startswith('failed: ')
    out = tmp_path / 'r.json'
    compare.write_json(out, {'results': compare.results_json(rs, 'var_jax', 'official', 4)})
    data = json.loads(out.read_text())['results']
    assert data[0]['speed_ratio'] == pytest.approx(train.ratio('var_jax', 'official'))
    assert len(data[0]['seconds']['official']) == 3 and 'note' in data[1] and 'median_s' not in data[2]
    assert [p.name for p in tmp_path.iterdir()] == ['r.json']  # no temporary file left


def test_interleaving_stops_at_the_deadline():
    log = []
    rs = compare.interleaved([_FakeSide('a', 0.0, log), _FakeSide('b', 0.0, log)], ['train'], warmup=1, repeats=50,
                             log=lambda m: None, deadline=time.monotonic() - 1)
    assert len(rs[0].times['a']) == len(rs[0].times['b']) == 1


def _official_checkout():
    if not (OFFICIAL / 'models' / 'var.py').is_file():
        pytest.skip(f'no official checkout at {OFFICIAL} (set VAR_JAX_OFFICIAL)')
    pytest.importorskip('torch')
    return OFFICIAL


@pytest.mark.slow
def test_compare_tiny_against_the_official_code(tmp_path, capsys):
    official = _official_checkout()
    out = tmp_path / 'compare.json'
    rc = bench.main(['compare', '--official', str(official), '--tiny', '--repeats', '2', '--json', str(out),
                     '--workloads', 'train,train_tokens,sample,decode'])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert '--tiny: VAR depth 2, width 128' in text and 'top-k 64' in text and 'built by build_vae_var' in text
    rows = _table(text)
    assert [r[0] for r in rows] == ['train', 'train_tokens', 'sample', 'decode']
    for r in rows:
        assert all(float(c) > 0 for c in r[1:5]) and re.fullmatch(r'\d+\.\d\dx', r[5])
    data = json.loads(out.read_text())
    assert data['official']['builder'] == 'build_vae_var' and data['dtype'] == 'float32'
    assert [len(r['seconds']['var_jax']) for r in data['results']] == [2, 2, 2, 2]
    assert 'models' in sys.modules and torch_reset_parameters_work()


def torch_reset_parameters_work() -> bool:
    """build_vae_var switches torch's init off for good; compare puts it back."""
    import torch  # noqa: PLC0415  (optional: the test is skipped without it)

    return torch.nn.Linear(4, 4).weight.abs().sum() > 0


# --- device: the one-shot accelerator check ------------------------------------------------------


@pytest.mark.parametrize('argv,match', [
    (['--budget', '0'], '--budget must be > 0'),
    (['--official', '/nonexistent/VAR'], '--official: no such directory'),
])
def test_device_check_bad_arguments(argv, match, tmp_path, capsys):
    assert bench.main(['device', '--smoke', '--out', str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and match in err and '\n' not in err


@pytest.mark.slow
def test_device_check_smoke(tmp_path, capsys):
    """Every part of the check runs on the CPU with tiny models, each in its own process (a generous
    budget: the default 90 s is for an idle machine), and one table sums them up."""
    official = OFFICIAL if (OFFICIAL / 'models' / 'var.py').is_file() and _has_torch() else None
    argv = ['device', '--smoke', '--out', str(tmp_path), '--budget', '900']
    rc = bench.main(argv + (['--official', str(official)] if official else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads((tmp_path / 'device_check.json').read_text())
    assert data['smoke'] and set(data['parts']) == set(device.PARTS)
    for name, part in data['parts'].items():
        if name == 'official' and not official:
            assert part['status'] == 'not run: no --official DIR given'
        else:
            assert part['status'] == 'ok', (name, part)
    checks = [r[0] for r in _table(out)]
    assert checks[:3] == ['matmul peak', 'train d16 (smoke: tiny)', 'train d20 (smoke: tiny)']
    assert checks.count('sample d16 (smoke: tiny)') == len(device.SMOKE_SAMPLE_BATCHES)
    assert 'memory d30 (smoke: tiny)' in checks
    train = data['parts']['train_d16']['rows'][0]['values']
    assert train['img_per_s'] > 0 and train['tflops'] > 0 and 0 < train['mfu']
    if official:
        assert {'vs official: train', 'vs official: sample'} <= set(checks)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401, PLC0415  (optional: is it installed?)
    except ImportError:
        return False
    return True
