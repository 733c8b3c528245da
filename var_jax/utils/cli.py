"""Shared command-line plumbing: quiet library logs, one-line errors for expected mistakes.

Every `python -m var_jax.<tool>` prints `error: <what is wrong>` on stderr and exits with code 2
for the mistakes a user can make (bad flags or config values, missing or corrupt files); only
genuine bugs show a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import zipfile
import zlib
from typing import Callable

EXPECTED = (ValueError, FileNotFoundError, FloatingPointError)


class Parser(argparse.ArgumentParser):
    """argparse with the one error style: a bad flag is an expected mistake (`run` prints it)."""

    def error(self, message):  # argparse prints usage and exits; keep it to one `error:` line, code 2
        raise ValueError(f'{message} (see --help)')


def quiet_logs() -> None:
    """Orbax, absl and JAX log every checkpoint step at INFO; keep the console for our progress."""
    try:
        from absl import logging as absl_logging  # noqa: PLC0415  (optional here: not every tool loads absl)

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    for name in ('jax._src.xla_bridge', 'absl', 'orbax', 'jax'):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(fn: Callable[[], int | None]) -> int:
    """Call `fn`; expected errors become one `error:` line and exit code 2."""
    quiet_logs()
    try:
        code = int(fn() or 0)
    except EXPECTED as e:
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        code = 130
    except SystemExit:
        raise
    except BaseException:
        if _multiprocess_run():
            traceback.print_exc()
            _exit_now(1)
        raise
    if code and _multiprocess_run():
        _exit_now(code)
    return code


def _multiprocess_run() -> bool:
    """Is this process one rank of a jax.distributed run? (without importing JAX)"""
    if 'jax' not in sys.modules:
        return False
    try:
        from jax._src import distributed  # noqa: PLC0415  (only once JAX is loaded: never import it here)

        return distributed.global_state.client is not None and distributed.global_state.num_processes > 1
    except (ImportError, AttributeError):
        return False


def _exit_now(code: int) -> None:
    """Exit a failed rank without `jax.distributed.shutdown` (atexit): that waits for every other
    rank, which are still training or blocked in a collective with this one, so the launcher would
    see nothing until the coordination service times out minutes later and aborts them all."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# a damaged or unreadable input file: an expected mistake for commands that read user files
FILE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


def run_reading_files(fn: Callable[[], int | None]) -> int:
    """`run` for commands that read user files (`evaluate`): an unreadable, truncated or damaged
    file (`FILE_ERRORS`) is one `error:` line and exit code 2 too, not a traceback."""
    def guarded():
        try:
            return fn()
        except FILE_ERRORS as e:
            raise ValueError(str(e)) from e
    return run(guarded)
