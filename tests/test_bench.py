"""`python -m var_jax.bench`: each workload runs and prints its table; bad arguments are one line.

Speed itself is not asserted (benchmarks, not timed tests): docs/benchmarks.md has the numbers.
"""
from __future__ import annotations

import re

import pytest

from var_jax import bench

from conftest import REPO


def _table(out: str) -> list[list[str]]:
    rows = [line for line in out.splitlines() if line.startswith('| ') and not line.startswith('| batch')]
    return [[c.strip() for c in r.strip('|').split('|')] for r in rows]


def test_train_step_against_the_autodiff_norm_baseline(capsys):
    rc = bench.main(['train', '--config', str(REPO / 'configs' / 'tiny.py') + ':ci', '--batch', '2',
                     '--warmup', '1', '--repeats', '2', '--baseline', 'autodiff_norm'])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 'VAR depth 2 width 128, 130 tokens' in out and '(1 of ' in out
    (row,) = _table(out)
    batch, ms, img_s, base_ms, ratio = row
    assert batch == '2' and float(ms) > 0 and float(base_ms) > 0
    assert float(img_s) == pytest.approx(2 / (float(ms) / 1e3), rel=0.02)
    assert re.fullmatch(r'\d+\.\d\dx', ratio)


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
