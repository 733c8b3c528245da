"""cli.run: one-line errors, and a failed rank of a multi-process run exits at once; cli.Parser;
cli.run_reading_files: a damaged input file is an expected mistake too."""
from __future__ import annotations

import zipfile
import zlib

import pytest

from var_jax.utils import cli


class _Exited(Exception):  # noqa: N818  (stands in for os._exit, not an error)
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


def test_parser_errors_are_expected_mistakes(capsys):
    p = cli.Parser(prog='tool')
    p.add_argument('--n', type=int, required=True)
    assert cli.run(lambda: p.parse_args(['--n', 'x']) and 0) == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x' (see --help)\n"


@pytest.mark.parametrize('exc', [EOFError('short read'), zipfile.BadZipFile('bad\nzip'), zlib.error('bad deflate'),
                                 PermissionError('denied')])
def test_damaged_files_are_one_line_when_reading_files(exits, capsys, exc):
    assert cli.run_reading_files(_fail(exc)) == 2
    assert capsys.readouterr().err == 'error: ' + ' '.join(str(exc).split()) + '\n'
    with pytest.raises(type(exc)):  # plain `run`: not an expected mistake there
        cli.run(_fail(exc))
    assert cli.run_reading_files(lambda: 3) == 3 and exits == []
