"""Speed benchmarks; one subcommand per workload.

    python -m var_jax.bench sample --model d16 [--batch 1,16,64] [--cfg 1.5 --top_k 900 --top_p 0.96]
    python -m var_jax.bench sample --checkpoint DIR [--repeats 5] [--dtype bfloat16]
    python -m var_jax.bench train --config configs/tiny.py [--batch 16,32] [--baseline autodiff_norm|autodiff_dense]
    python -m var_jax.bench train --config configs/d16.py --batch 2 --attention blockwise --baseline xla_attention
    python -m var_jax.bench train --config configs/tokenizer_tiny.py [--batch 16]
    python -m var_jax.bench compare --official DIR [--depth 16] [--workloads train,sample] [--json FILE]
    python -m var_jax.bench device [--out DIR] [--official DIR] [--smoke]

Each subcommand is one module of `var_jax.benchmarks` (`sample`, `train`, `compare`, `device`).

`sample` times class-conditional sampling on one device, as images per second for each batch
size, with the transformer (`generate.generate_fhat`: all scales, KV cache, guidance with the
batch doubled, top-k/top-p) and the tokenizer decode (`vqvae.decode`) timed separately.
Compilation is excluded: each part is first run `--warmup` times (the first run compiles), then
`--repeats` timed runs, each ended by `block_until_ready`; the table gives the median.
`--model` builds random weights (the speed does not depend on them): d16..d30 are the official
256 px models, d36 the 512 px one, each with the official tokenizer; `tiny` is the 8 px model of
`var_jax.testing`, for smoke tests.

`train` times the VAR train step of a training config (the jitted step of `var_jax.train`:
tokenizer encode, VAR forward and backward, AdamW) on random images, with random weights for the
config's tokenizer (its `tokenizer.train.model`, else the official one). `--baseline
autodiff_norm` also times the same step with JAX's autodiff of LayerNorm instead of the
hand-written backward (`models.var.layer_norm`), `--baseline autodiff_dense` with autodiff's
weight gradients of the Linears instead of `models.var.dense`'s, and reports the ratio, both
measured in the same process, interleaved run by run so that load on the machine hits both alike. `--tokens`
likewise times the step of pre-tokenized training (`data.source='tokens'`: random token batches,
teacher-forcing input from the indices, no encoder) against the step from images. With a
tokenizer config (configs/tokenizer*.py) it times the step of `var_jax.train_tokenizer` instead
(encode, multi-scale quantization, decode, the config's losses and discriminator, AdamW, codebook
usage and dead-code re-seeding).

`compare` times the same workloads in var_jax and in the official PyTorch code, imported from
your own checkout (`--official DIR`, torch needed), interleaved run by run, and reports the speed
ratio (`var_jax.benchmarks.compare`; what runs on each side: `var_jax.benchmarks.official`):

    python -m var_jax.bench compare --official DIR [--depth 16] [--batch 2] [--dtype float32] \
        [--threads 2] [--workloads train,train_encode,train_tokens,sample,encode,decode] [--repeats 3] [--json FILE]

`device` is the one-shot accelerator check (`var_jax.benchmarks.device`; docs/gpu.md): matmul
peak, d16/d20 train-step img/s and MFU, d16 sampling, d30 compiled memory and `compare`, each
part in its own process under a time budget, within 8 minutes; `--smoke` runs it on the CPU:

    python -m var_jax.bench device [--out DIR] [--official DIR] [--budget 450] [--smoke]

The table goes to stdout (markdown), progress to stderr.
"""
from __future__ import annotations

import argparse
import sys

from var_jax.benchmarks import compare, device, sample, train
from var_jax.models.config import ATTENTION
from var_jax.utils import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog='python -m var_jax.bench', description=__doc__.split('\n\n')[0], allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND', parser_class=cli.Parser)

    s = sub.add_parser('sample', help='sampling throughput (transformer and decode)', allow_abbrev=False)
    model = s.add_mutually_exclusive_group(required=True)
    model.add_argument('--model', choices=sample.MODELS, help='official architecture with random weights')
    model.add_argument('--checkpoint', help='converted checkpoint or training workdir')
    s.add_argument('--step', type=int, help='training workdirs: the step to load (default: the latest)')
    s.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                   help='compute dtype (default: float32, or the checkpoint\'s)')
    s.add_argument('--batch', default='1,16,64', help='comma-separated batch sizes (default 1,16,64)')
    s.add_argument('--cfg', type=float, default=1.5,
                   help='guidance scale (default 1.5); any scale > 0 runs the doubled (class + null class) batch, '
                        '0 runs the class rows only')
    s.add_argument('--top_k', type=int, default=900, help='default 900')
    s.add_argument('--top_p', type=float, default=0.96, help='default 0.96')
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--warmup', type=int, default=1, help='untimed runs first (the first compiles; default 1)')
    s.add_argument('--repeats', type=int, default=5, help='timed runs; the median is reported (default 5)')
    s.set_defaults(run=sample.main)

    t = sub.add_parser('train', help='train-step time for a VAR or tokenizer training config', allow_abbrev=False)
    t.add_argument('--config', required=True, help='training config file, optionally with :arg '
                                                   '(e.g. configs/tiny.py, configs/tokenizer_tiny.py)')
    t.add_argument('--batch', default='16,32', help='comma-separated batch sizes (default 16,32)')
    t.add_argument('--baseline', choices=('autodiff_norm', 'autodiff_dense', 'xla_attention'),
                   help='also time the step with JAX\'s autodiff LayerNorm backward (autodiff_norm), autodiff\'s '
                        'weight gradients of the Linears (autodiff_dense) or model.attention=\'xla\' '
                        '(xla_attention) and report the ratio')
    t.add_argument('--attention', choices=ATTENTION, help='VAR configs: set model.attention for the timed step')
    t.add_argument('--tokens', action='store_true',
                   help='also time the step from pre-tokenized data (data.source=tokens: no encoder) and report '
                        'the ratio')
    t.add_argument('--warmup', type=int, default=3, help='untimed steps first (default 3)')
    t.add_argument('--repeats', type=int, default=20, help='timed steps; the median is reported (default 20)')
    t.add_argument('--profile', type=int, default=0, metavar='N',
                   help='then profile one more step and list its N slowest XLA ops (where the time goes)')
    t.set_defaults(run=train.main)

    c = sub.add_parser('compare', help='var_jax against the official PyTorch code: same workloads, interleaved',
                       allow_abbrev=False)
    c.add_argument('--official', required=True, metavar='DIR',
                   help='your checkout of FoundationVision/VAR (its models/ package is imported; needs torch)')
    arch = c.add_mutually_exclusive_group()
    arch.add_argument('--depth', type=int, default=16, help='official VAR-dD, 256 px, official tokenizer (default 16)')
    arch.add_argument('--config', help='the VAR of a training config instead (e.g. configs/tiny.py)')
    arch.add_argument('--tiny', action='store_true', help='a small official-layout pair (tests)')
    c.add_argument('--batch', type=int, default=2, help='default 2')
    c.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='float32 (default) or bfloat16 (var_jax compute dtype; official autocast)')
    c.add_argument('--threads', type=int, help='CPU threads of each side (default: every core this process may use)')
    c.add_argument('--workloads', default='train,train_encode,train_tokens,sample,encode,decode',
                   help='comma-separated, from train,train_encode,train_tokens,sample,encode,decode (default: all)')
    c.add_argument('--warmup', type=int, default=1, help='untimed runs per side first (default 1)')
    c.add_argument('--repeats', type=int, default=3, help='timed runs per side, interleaved (default 3)')
    c.add_argument('--cfg', type=float, default=1.5, help='sampling guidance (default 1.5)')
    c.add_argument('--top_k', type=int, default=900, help='sampling top-k (default 900; at most V)')
    c.add_argument('--top_p', type=float, default=0.96, help='sampling top-p (default 0.96)')
    c.add_argument('--seed', type=int, default=0)
    c.add_argument('--json', metavar='FILE', help='also write the settings and every timed run as JSON')
    c.set_defaults(run=compare.main)

    d = sub.add_parser('device', help='one-shot accelerator check (< 8 min): peak, train MFU, sampling, memory, '
                                      'official side by side', allow_abbrev=False)
    d.add_argument('--out', help='folder for the JSON (default: $OUT, else ./device_check)')
    d.add_argument('--official', metavar='DIR', help='also compare with the official code of this checkout')
    d.add_argument('--budget', type=float, help='seconds for all parts (default 450; --smoke 180)')
    d.add_argument('--smoke', action='store_true', help='the same code path on the CPU with tiny models (CI)')
    d.add_argument('--part', help=argparse.SUPPRESS)  # one part, in a child process
    d.add_argument('--part_budget', type=float, help=argparse.SUPPRESS)
    d.add_argument('--peak_tflops', type=float, help=argparse.SUPPRESS)
    d.set_defaults(run=device.main)
    return p


def main(argv=None) -> int:
    return cli.run(lambda: (lambda a: a.run(a))(build_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
