"""`python -m var_jax.train` that SIGKILLs itself right after step N, once pending checkpoint
writes are on disk: the `kill -9` of the resume test without a timing race.

    PYTHONPATH=. python tests/train_killed_after.py N [the flags of var_jax.train]
"""
import functools
import sys

from var_jax.training import command, var_task

if __name__ == '__main__':
    step = int(sys.argv.pop(1))
    command.main(functools.partial(var_task.run, kill_after_step=step), default_config='configs/tiny.py',
                 config_help='training config file', dry_run_help='(unused)', memory_help='(unused)')
