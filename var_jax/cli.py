"""Shared command-line plumbing: quiet library logs, one-line errors for expected mistakes.

Every `python -m var_jax.<tool>` prints `error: <what is wrong>` on stderr and exits with code 2
for the mistakes a user can make (bad flags or config values, missing or corrupt files); only
genuine bugs show a traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

EXPECTED = (ValueError, FileNotFoundError, FloatingPointError)


def quiet_logs() -> None:
    """Orbax, absl and JAX log every checkpoint step at INFO; keep the console for our progress."""
    try:
        from absl import logging as absl_logging  # noqa: PLC0415

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    for name in ('jax._src.xla_bridge', 'absl', 'orbax', 'jax'):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(fn: Callable[[], int | None]) -> int:
    """Call `fn`; expected errors become one `error:` line and exit code 2."""
    quiet_logs()
    try:
        return int(fn() or 0)
    except EXPECTED as e:
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
