r"""Encode a training set once with the frozen tokenizer, for VAR training without the encoder.

    python -m var_jax.pretokenize --config=configs/d16.py --out DIR [--views N] [--workdir RUN]
        [--batch 64] [--shard_size 4096] [--max_images N] [--config.field=value ...]
    python -m var_jax.train --config=configs/d16.py --workdir=RUN \
        --config.data.source=tokens --config.data.path=DIR

Writes `views` x (2 if config.data.hflip else 1) token records per readable image of the
config's training split (format: var_jax/data/tokens.py; docs/pretokenize.md), with
config.tokenizer.checkpoint, else RUN/tokenizer of a `var_jax.train --workdir RUN` that trained
one. A rerun with the same arguments skips finished shards and redoes only the interrupted one.
The work is `var_jax.data.token_writer.write_tokens`.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from var_jax.data import token_writer
from var_jax.utils import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'training config file (its data and tokenizer)',
                                    lock_config=True)
    flags.DEFINE_string('out', None, 'output directory for the token shards; re-running resumes', required=True)
    flags.DEFINE_integer('views', 1, 'crops per image (the first centred, the others at seeded random positions); '
                                     'x2 with config.data.hflip')
    flags.DEFINE_string('workdir', None, 'a var_jax.train workdir whose trained tokenizer to use '
                        '(when config.tokenizer.checkpoint is empty)')
    flags.DEFINE_integer('batch', 64, 'images per encoder call (rounded up to a multiple of the local devices)')
    flags.DEFINE_integer('shard_size', 4096, 'source images per shard (the unit of resume)')
    flags.DEFINE_integer('max_images', 0, 'only the first N images of the split (0 = all; smoke tests)')


def main(argv):
    del argv
    f = FLAGS
    sys.exit(cli.run(lambda: token_writer.write_tokens(f.config, f.out, views=f.views, workdir=f.workdir,
                                                       batch=f.batch, shard_size=f.shard_size,
                                                       max_images=f.max_images) and 0))


if __name__ == '__main__':
    define_flags()
    app.run(main)
