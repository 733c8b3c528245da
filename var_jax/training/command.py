"""The command line both trainers share: `--config FILE[:preset] --workdir DIR [--dry_run
[--dry_run_memory_gib G]]` plus `--config.a.b=value` overrides (absl + ml_collections), parsed by
`configs.parse_flags`, run through `cli.run` (one `error:` line and exit code 2 for a user's
mistake; 75 for a run stopped by a signal, `loop.EXIT_STOPPED`)."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from var_jax.training import configs
from var_jax.utils import cli

flags.disclaim_key_flags()  # the flags defined below belong to the command that calls `main` (its --help)


def main(run: Callable[..., dict], *, default_config: str, config_help: str, dry_run_help: str,
         memory_help: str) -> None:
    """Define the flags, parse them and exit with the status of
    `run(config, workdir, dry_run=..., device_memory_gib=...)`."""
    config_flags.DEFINE_config_file('config', default_config, config_help, lock_config=True)
    flags.DEFINE_string('workdir', None, 'output directory (local or gs://); re-running resumes', required=True)
    flags.DEFINE_bool('dry_run', False, dry_run_help)
    flags.DEFINE_float('dry_run_memory_gib', 0.0, memory_help)

    def _main(argv):
        del argv
        f = flags.FLAGS
        sys.exit(cli.run(lambda: run(f.config, f.workdir, dry_run=f.dry_run,
                                     device_memory_gib=f.dry_run_memory_gib) and 0))

    app.run(_main, flags_parser=configs.parse_flags)
