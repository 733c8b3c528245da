"""cli.run: one-line errors, and a failed rank of a multi-process run exits at once."""
from __future__ import annotations

import pytest

from var_jax.utils import cli


class _Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    """Record `_exit_now` instead of ending the test process."""
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(cli, '_exit_now', fake_exit)
    return codes


def _fail(exc):
    def fn():
        raise exc
    return fn


def test_expected_error_is_one_line_and_code_2(exits, capsys):
    assert cli.run(_fail(ValueError('config: bad\n  value'))) == 2
    assert capsys.readouterr().err == 'error: config: bad value\n'
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 3) == 3
    assert exits == [], 'a single-process run returns normally (atexit handlers run)'


@pytest.mark.parametrize('exc, code', [(ValueError('bad'), 2), (RuntimeError('bug'), 1), (KeyboardInterrupt(), 130)])
def test_failed_rank_skips_the_distributed_shutdown(exits, monkeypatch, capsys, exc, code):
    # jax.distributed.shutdown (atexit) waits for all ranks; a failed rank must not wait there
    monkeypatch.setattr(cli, '_multiprocess_run', lambda: True)
    with pytest.raises(_Exited):
        cli.run(_fail(exc))
    assert exits == [code]
    if code == 1:
        assert 'RuntimeError: bug' in capsys.readouterr().err, 'a bug still shows its traceback'


def test_clean_stop_of_a_rank_still_returns(exits, monkeypatch):
    monkeypatch.setattr(cli, '_multiprocess_run', lambda: True)
    assert cli.run(lambda: 0) == 0
    with pytest.raises(SystemExit):  # the stop-signal path: every rank stops at the same step
        cli.run(_fail(SystemExit(0)))
    assert exits == []


def test_multiprocess_run_is_false_here():
    assert cli._multiprocess_run() is False
