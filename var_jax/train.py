"""Train VAR: `python -m var_jax.train --config=configs/d20.py --workdir=DIR [--dry_run]`.

The step (official `VARTrainer.train_step`): the frozen tokenizer turns images into per-scale
tokens (float32) -> teacher-forcing input -> VAR forward (label dropout, drop-path) in the compute
dtype -> mean cross-entropy over all L tokens -> AdamW. Logged as the official trainer does:
Lm, Lt (last scale), Accm, Acct, grad norm (pre-clip), lr, per-scale accuracy and loss,
vocabulary usage, images/s, tokens/s and TFLOP/s.

With `data.source='tokens'` (a directory of `python -m var_jax.pretokenize`) the batches carry the
tokens instead of images and the step starts at the teacher-forcing input (codebook lookups,
bicubic up / area down, the Phi convs: official `idxBl_to_var_input`), skipping the encoder.
"""
# the command line only (its docstring is its --help); the task is var_jax/training/var_task.py, the loop
# var_jax/training/loop.py, the flags var_jax/training/command.py
from __future__ import annotations

from var_jax.training import command, var_task

if __name__ == '__main__':
    command.main(var_task.run, default_config='configs/tiny.py', config_help='training config file',
                 dry_run_help='compile the sharded step from abstract shapes, print memory, exit',
                 memory_help='with --dry_run: the memory of one target device in GiB (default: what the device '
                             'reports; a CPU reports none), to say which settings fit')
