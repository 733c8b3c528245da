"""Speed benchmarks; one subcommand per workload.

    python -m var_jax.bench sample --model d16 [--batch 1,16,64] [--cfg 1.5 --top_k 900 --top_p 0.96]
    python -m var_jax.bench sample --checkpoint DIR [--repeats 5] [--dtype bfloat16]
    python -m var_jax.bench train --config configs/tiny.py [--batch 16,32] [--baseline autodiff_norm]
    python -m var_jax.bench train --config configs/d16.py --batch 2 --attention blockwise --baseline xla_attention
    python -m var_jax.bench train --config configs/tokenizer_tiny.py [--batch 16]
    python -m var_jax.bench compare --official DIR [--depth 16] [--workloads train,sample] [--json FILE]
    python -m var_jax.bench device [--out DIR] [--official DIR] [--smoke]

`sample` times class-conditional sampling on one device, as images per second for each batch
size, with the transformer (`generate.generate_fhat`: all scales, KV cache, guidance with the
batch doubled, top-k/top-p) and the tokenizer decode (`vqvae.decode`) timed separately.
Compilation is excluded: each part is first run `--warmup` times (the first run compiles), then
`--repeats` timed runs, each ended by `block_until_ready`; the table gives the median.
`--model` builds random weights (the speed does not depend on them): d16..d30 are the official
256 px models, d36 the 512 px one, each with the official tokenizer; `tiny` is an 8 px model for
smoke tests.

`train` times the VAR train step of a training config (the jitted step of `var_jax.train`:
tokenizer encode, VAR forward and backward, AdamW) on random images, with random weights for the
config's tokenizer (its `tokenizer.train.model`, else the official one). `--baseline
autodiff_norm` also times the same step with JAX's autodiff of LayerNorm instead of the
hand-written backward (`models.var.layer_norm`) and reports the ratio, both measured in the
same process, interleaved run by run so that load on the machine hits both alike. `--tokens`
likewise times the step of pre-tokenized training (`data.source='tokens'`: random token batches,
teacher-forcing input from the indices, no encoder) against the step from images. With a
tokenizer config (configs/tokenizer*.py) it times the step of `var_jax.train_tokenizer` instead
(encode, multi-scale quantization, decode, the config's losses and discriminator, AdamW, codebook
usage and dead-code re-seeding).

`compare` times the same workloads in var_jax and in the official PyTorch code, imported from
your own checkout (`--official DIR`, torch needed), interleaved run by run, and reports the speed
ratio (`var_jax.benchmarks.compare`; what runs on each side: `var_jax.benchmarks.official`):

    python -m var_jax.bench compare --official DIR [--depth 16] [--batch 2] [--dtype float32] \
        [--threads 2] [--workloads train,train_encode,sample,encode,decode] [--repeats 3] [--json FILE]

`device` is the one-shot accelerator check (`var_jax.benchmarks.device`; docs/gpu.md): matmul
peak, d16/d20 train-step img/s and MFU, d16 sampling, d30 compiled memory and `compare`, each
part in its own process under a time budget, within 8 minutes; `--smoke` runs it on the CPU:

    python -m var_jax.bench device [--out DIR] [--official DIR] [--budget 450] [--smoke]

The table goes to stdout (markdown), progress to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from unittest import mock

import jax
import numpy as np
from flax import nnx

from var_jax.models import VARConfig, VQVAEConfig, create, var_config, vqvae_config
from var_jax.models.config import ATTENTION
from var_jax.sampling import generate
from var_jax.sampling.settings import check_settings
from var_jax.training import configs
from var_jax.utils import cli

TINY = (VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4)),
        VARConfig(depth=2, width=64, num_heads=2, vocab_size=64, cvae=8, patch_nums=(1, 2, 3, 4), num_classes=10))
MODELS = ('tiny', 'd16', 'd20', 'd24', 'd30', 'd36')


def preset(name: str, dtype: str) -> tuple[VQVAEConfig, VARConfig]:
    if name == 'tiny':
        vq, var = TINY
    else:
        var = var_config(int(name[1:]))
        vq = vqvae_config(patch_nums=var.patch_nums)
    return vq.replace(dtype=dtype), var.replace(dtype=dtype)


def build_models(args):
    """-> (vqvae, var, description) from --model (random weights) or --checkpoint."""
    if args.checkpoint:
        from var_jax.io.checkpoint import merge_params  # noqa: PLC0415
        from var_jax.sample import open_checkpoint  # noqa: PLC0415

        ck = open_checkpoint(args.checkpoint, args.step)
        vqvae, var = ck.load()
        if args.dtype:  # same parameters, other compute dtype
            vqvae = merge_params(vqvae.config.replace(dtype=args.dtype), nnx.state(vqvae, nnx.Param))
            var = merge_params(var.config.replace(dtype=args.dtype), nnx.state(var, nnx.Param))
        return vqvae, var, f'checkpoint {args.checkpoint}'
    vq_cfg, var_cfg = preset(args.model, args.dtype or 'float32')
    print(f'building {args.model} with random weights ...', file=sys.stderr, flush=True)
    return create(vq_cfg, seed=0), create(var_cfg, seed=1), f'--model {args.model} (random weights)'


@nnx.jit
def _decode(vqvae, f_hat):
    return (vqvae.decode(f_hat) + 1) / 2


def timed(fn, warmup: int, repeats: int) -> tuple[float, list[float], object]:
    """-> (first call's seconds, compile included; timed runs' seconds; last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times, out


def bench_sample(args) -> int:
    s = check_settings(args.cfg, args.top_k, args.top_p, False)
    batches = _int_list(args.batch, '--batch')
    if args.warmup < 1 or args.repeats < 1:
        raise ValueError('--warmup and --repeats must be >= 1')
    vqvae, var, what = build_models(args)
    c = var.config
    rows = []
    for b in batches:
        labels = np.arange(b, dtype=np.int32) % c.num_classes
        key = jax.random.key(args.seed)
        print(f'batch {b}: transformer ...', file=sys.stderr, flush=True)
        gen_first, gen, (_, f_hat) = timed(
            lambda: generate.generate_fhat(var, vqvae, labels, key, s.cfg, s.top_k, s.top_p), args.warmup, args.repeats)
        print(f'batch {b}: decode ...', file=sys.stderr, flush=True)
        dec_first, dec, _ = timed(lambda: _decode(vqvae, f_hat), args.warmup, args.repeats)
        g, d = statistics.median(gen), statistics.median(dec)
        rows.append((b, g, d, gen_first - g, dec_first - d))
    dev = jax.devices()[0]
    print(f'# sample: {what}, depth {c.depth}, {vqvae.config.image_size} px, {c.L} tokens, dtype {c.dtype}')
    kind = dev.device_kind if dev.device_kind == dev.platform else f'{dev.platform} {dev.device_kind}'
    print(f'# device: {kind} (1 of {jax.device_count()}); {s.describe()}; '
          f'median of {args.repeats} after {args.warmup} warm-up')
    print('| batch | transformer s | decode s | transformer img/s | decode img/s | total img/s | compile s (approx) |')
    print('|---:|---:|---:|---:|---:|---:|---:|')
    for b, g, d, gc, dc in rows:
        print(f'| {b} | {_num(g)} | {_num(d)} | {_num(b / g)} | {_num(b / d)} | {_num(b / (g + d))} | {_num(gc + dc)} |')
    return 0


def load_config(spec: str):
    """'path/to/config.py[:arg]' -> the ConfigDict its get_config(arg) returns."""
    path, _, arg = spec.partition(':')
    try:
        module_spec = importlib.util.spec_from_file_location('bench_config', path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ValueError(f'--config: no such file {path}') from None
    if not hasattr(module, 'get_config'):
        raise ValueError(f'--config: {path} has no get_config()')
    return module.get_config(arg or None)


def is_tokenizer_config(config) -> bool:
    """Tokenizer configs (configs.tokenizer_recipe) carry codebook settings; VAR configs do not."""
    return 'codebook' in config


def tokenizer_config(config) -> VQVAEConfig:
    """The tokenizer a VAR training config trains with: its `tokenizer.train.model`, else the official one."""

    t = config.tokenizer.get('train')
    return configs.vqvae_model_config(t.model) if t and 'model' in t else vqvae_config(
        patch_nums=configs.patch_nums_of(config))


def _one_device_config(config, batch: int, vq_cfg: VQVAEConfig | None = None):
    """-> the config resolved for one device at this batch size (every workload here runs on one)."""
    from var_jax.data import builtin  # noqa: PLC0415

    config = config.copy_and_resolve_references()
    config.batch_size = batch
    config.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    if not is_tokenizer_config(config):
        if not config.model.num_classes:
            config.model.num_classes = builtin.NUM_CLASSES if config.data.source == 'builtin' else 1000
        config.data.image_size = (vq_cfg or tokenizer_config(config)).image_size
    return config


class _GivenTokensTask:
    """Mixed into `VARTask`: the step reads the teacher-forcing input and targets from the batch
    (`x_in`, `target`) instead of encoding images, i.e. VAR alone (`compare`'s `train` workload)."""

    def teacher_forcing(self, mb, vq):
        return mb['x_in'], mb['target']


def _train_step_program(config, batch: int, baseline: bool, from_tokens: bool = False, *,
                        tokenizer: VQVAEConfig | None = None, var_alone: bool = False):
    """-> (compiled step, initial state, one batch, frozen params, model description).

    The step is the one `var_jax.train` (a VAR config) or `var_jax.train_tokenizer` (a tokenizer
    config) runs, built by the same `loop.setup` / `loop.compile_step`. `tokenizer`: the
    VQVAE a VAR config encodes with (default `tokenizer_config`). `var_alone`: the VAR step without
    the encode, fed random teacher-forcing input and targets (jitted on one device as `loop.setup`
    does, with the batch's two extra arrays)."""
    from var_jax.models import var as var_module  # noqa: PLC0415
    from var_jax.parallel import sharding
    from var_jax.train import VARTask  # noqa: PLC0415
    from var_jax.train_tokenizer import TokenizerTask  # noqa: PLC0415
    from var_jax.training import loop  # noqa: PLC0415

    config = _one_device_config(config, batch, tokenizer)
    num_classes = 1
    if from_tokens:  # the step of data.source='tokens': token batches, no encoder (var_jax/pretokenize.py)
        config.data.update(source='tokens', path='(random tokens)')
    if is_tokenizer_config(config):
        vq_cfg = configs.vqvae_model_config(config.model)
        config.data.image_size = vq_cfg.image_size
        task = TokenizerTask(config, tempfile.gettempdir())
        losses = [f'{k} {config.loss[k]:g}' for k in ('l1', 'l2', 'lpips', 'gan') if config.loss[k]]
        what = (f'tokenizer ch {vq_cfg.ch} x {tuple(vq_cfg.ch_mult)}, V {vq_cfg.vocab_size}, {vq_cfg.image_size} px, '
                f'{vq_cfg.num_scales} scales, loss {" + ".join(losses)}, {vq_cfg.dtype}')
    else:
        num_classes = config.model.num_classes
        vq_cfg = tokenizer or tokenizer_config(config)
        cls = type('VARAloneTask', (_GivenTokensTask, VARTask), {}) if var_alone else VARTask
        task = cls(config, tempfile.gettempdir(), tokenizer=create(vq_cfg, seed=0))
        c = task.var_cfg
        what = (f'VAR depth {c.depth} width {c.C}, {c.L} tokens, {c.dtype}; ' +
                ('no tokenizer (given tokens)' if var_alone else f'tokenizer ch {vq_cfg.ch}, {vq_cfg.image_size} px'))
    size = vq_cfg.image_size
    s = loop.setup(task, config, dataset_size=int(config.data.get('size_hint', loop.IMAGENET_TRAIN)),
                      image_size=size)
    rng = np.random.default_rng(0)
    spec = task.batch_spec(batch, size)
    data = {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)} if 'image' in spec else \
        {'tokens': rng.integers(0, vq_cfg.vocab_size, spec['tokens'].shape).astype(spec['tokens'].dtype)}
    data |= {'label': (np.arange(batch) % num_classes).astype(np.int32),
             'skipped': np.zeros(batch, np.int32)}
    if var_alone:
        c = task.var_cfg
        data['image'] = np.zeros((batch, 1, 1, 3), np.uint8)  # unread
        data['x_in'] = rng.standard_normal((batch, c.L - c.patch_nums[0] ** 2, c.cvae), dtype=np.float32)
        data['target'] = rng.integers(0, c.vocab_size, (batch, c.L), dtype=np.int32)
        data = jax.device_put(data, s.batch_shardings['label'])
        state = s.init_fn(jax.random.key(0))
        with sharding.use_mesh(s.mesh):
            compiled = jax.jit(loop._guarded(task, s.tx), donate_argnums=0).lower(state, data, s.frozen).compile()
        return compiled, state, data, s.frozen, what
    patch = (mock.patch.object(var_module, 'layer_norm', var_module.layer_norm_autodiff) if baseline
             else contextlib.nullcontext())
    with patch:  # the norm is looked up while tracing, so only this program uses the baseline
        compiled, _ = loop.compile_step(task, s, config, size)
    data = {k: jax.device_put(v, s.batch_shardings[k]) for k, v in data.items()}
    # from tokens: no state of its own; it runs on the image step's (same structure), which halves
    # the memory of the comparison (two d16 states did not fit a 23 GB machine)
    return compiled, None if from_tokens else s.init_fn(jax.random.key(0)), data, s.frozen, what


def bench_train(args) -> int:
    batches = _int_list(args.batch, '--batch')
    if args.warmup < 1 or args.repeats < 1:
        raise ValueError('--warmup and --repeats must be >= 1')
    config = load_config(args.config)
    tokenizer = is_tokenizer_config(config)
    if args.attention and not tokenizer:
        config.model.attention = args.attention
    configs.check(config, 'tokenizer' if tokenizer else 'var')
    if tokenizer and (args.baseline or args.attention or args.tokens):
        raise ValueError('--baseline, --attention and --tokens change the VAR step; a tokenizer config has none')
    if args.tokens and args.baseline:
        raise ValueError('--tokens and --baseline each compare with the plain step: give one of them')
    variants = ('step',) + (('baseline',) if args.baseline else ()) + (('tokens',) if args.tokens else ())
    rows, what = [], ''
    for b in batches:
        progs, states, datas = {}, {}, {}
        for v in variants:
            print(f'batch {b}: compiling the {v} ...', file=sys.stderr, flush=True)
            c = config
            if v == 'baseline' and args.baseline == 'xla_attention':  # the same step with the default attention
                c = config.copy_and_resolve_references()
                c.model.attention = 'xla'
            progs[v], states[v], datas[v], frozen, what = _train_step_program(
                c, b, v == 'baseline' and args.baseline == 'autodiff_norm', v == 'tokens')
        times = {v: [] for v in variants}
        for i in range(args.warmup + args.repeats):  # interleaved: machine load hits every variant alike
            for v in variants:
                t0 = time.perf_counter()
                sv = 'step' if v == 'tokens' else v
                states[sv], m = progs[v](states[sv], datas[v], frozen)
                jax.block_until_ready(m['loss'])
                if i >= args.warmup:
                    times[v].append(time.perf_counter() - t0)
        rows.append((b, {v: statistics.median(t) for v, t in times.items()}))
    dev = jax.devices()[0]
    kind = dev.device_kind if dev.device_kind == dev.platform else f'{dev.platform} {dev.device_kind}'
    print(f'# train: {args.config}: {what}')
    print(f'# device: {kind} (1 of {jax.device_count()}); median of {args.repeats} steps after {args.warmup} warm-up')
    if args.tokens:
        print('| batch | step from images ms | img/s | step from tokens ms | img/s | images / tokens |')
        print('|---:|---:|---:|---:|---:|---:|')
        for b, t in rows:
            print(f'| {b} | {_num(t["step"] * 1e3)} | {_num(b / t["step"])} | {_num(t["tokens"] * 1e3)} | '
                  f'{_num(b / t["tokens"])} | {t["step"] / t["tokens"]:.2f}x |')
    elif args.baseline:
        print(f'| batch | step ms | img/s | baseline ({args.baseline}) ms | speed-up |')
        print('|---:|---:|---:|---:|---:|')
        for b, t in rows:
            print(f'| {b} | {_num(t["step"] * 1e3)} | {_num(b / t["step"])} | {_num(t["baseline"] * 1e3)} | '
                  f'{t["baseline"] / t["step"]:.2f}x |')
    else:
        print('| batch | step ms | img/s |')
        print('|---:|---:|---:|')
        for b, t in rows:
            print(f'| {b} | {_num(t["step"] * 1e3)} | {_num(b / t["step"])} |')
    return 0


def _num(v: float) -> str:
    return f'{v:.3g}' if v < 1000 else f'{v:,.0f}'


def _int_list(text: str, flag: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise ValueError(f'{flag} must be comma-separated integers, got {text!r}') from None
    if not out or min(out) < 1:
        raise ValueError(f'{flag} must be positive integers, got {text!r}')
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog='python -m var_jax.bench', description=__doc__.split('\n\n')[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND', parser_class=cli.Parser)

    s = sub.add_parser('sample', help='sampling throughput (transformer and decode)', allow_abbrev=False)
    model = s.add_mutually_exclusive_group(required=True)
    model.add_argument('--model', choices=MODELS, help='official architecture with random weights')
    model.add_argument('--checkpoint', help='converted checkpoint or training workdir')
    s.add_argument('--step', type=int, help='training workdirs: the step to load (default: the latest)')
    s.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                   help='compute dtype (default: float32, or the checkpoint\'s)')
    s.add_argument('--batch', default='1,16,64', help='comma-separated batch sizes (default 1,16,64)')
    s.add_argument('--cfg', type=float, default=1.5, help='guidance scale (default 1.5); any scale > 0 runs the doubled '
                                                        '(class + null class) batch, 0 runs the class rows only')
    s.add_argument('--top_k', type=int, default=900, help='default 900')
    s.add_argument('--top_p', type=float, default=0.96, help='default 0.96')
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--warmup', type=int, default=1, help='untimed runs first (the first compiles; default 1)')
    s.add_argument('--repeats', type=int, default=5, help='timed runs; the median is reported (default 5)')
    s.set_defaults(run=bench_sample)

    t = sub.add_parser('train', help='train-step time for a VAR or tokenizer training config', allow_abbrev=False)
    t.add_argument('--config', required=True, help='training config file, optionally with :arg '
                                                   '(e.g. configs/tiny.py, configs/tokenizer_tiny.py)')
    t.add_argument('--batch', default='16,32', help='comma-separated batch sizes (default 16,32)')
    t.add_argument('--baseline', choices=('autodiff_norm', 'xla_attention'),
                   help='also time the step with JAX\'s autodiff LayerNorm backward (autodiff_norm) or with '
                        'model.attention=\'xla\' (xla_attention) and report the ratio')
    t.add_argument('--attention', choices=ATTENTION, help='VAR configs: set model.attention for the timed step')
    t.add_argument('--tokens', action='store_true',
                   help='also time the step from pre-tokenized data (data.source=tokens: no encoder) and report '
                        'the ratio')
    t.add_argument('--warmup', type=int, default=3, help='untimed steps first (default 3)')
    t.add_argument('--repeats', type=int, default=20, help='timed steps; the median is reported (default 20)')
    t.set_defaults(run=bench_train)

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
    c.add_argument('--workloads', default='train,train_encode,sample,encode,decode',
                   help='comma-separated, from train,train_encode,sample,encode,decode (default: all)')
    c.add_argument('--warmup', type=int, default=1, help='untimed runs per side first (default 1)')
    c.add_argument('--repeats', type=int, default=3, help='timed runs per side, interleaved (default 3)')
    c.add_argument('--cfg', type=float, default=1.5, help='sampling guidance (default 1.5)')
    c.add_argument('--top_k', type=int, default=900, help='sampling top-k (default 900; at most V)')
    c.add_argument('--top_p', type=float, default=0.96, help='sampling top-p (default 0.96)')
    c.add_argument('--seed', type=int, default=0)
    c.add_argument('--json', metavar='FILE', help='also write the settings and every timed run as JSON')
    c.set_defaults(run=_compare)

    d = sub.add_parser('device', help='one-shot accelerator check (< 8 min): peak, train MFU, sampling, memory, '
                                      'official side by side', allow_abbrev=False)
    d.add_argument('--out', help='folder for the JSON (default: $OUT, else ./device_check)')
    d.add_argument('--official', metavar='DIR', help='also compare with the official code of this checkout')
    d.add_argument('--budget', type=float, help='seconds for all parts (default 450; --smoke 180)')
    d.add_argument('--smoke', action='store_true', help='the same code path on the CPU with tiny models (CI)')
    d.add_argument('--part', help=argparse.SUPPRESS)  # one part, in a child process
    d.add_argument('--part_budget', type=float, help=argparse.SUPPRESS)
    d.add_argument('--peak_tflops', type=float, help=argparse.SUPPRESS)
    d.set_defaults(run=_device)
    return p


def _device(args) -> int:
    from var_jax.benchmarks import device  # noqa: PLC0415

    return device.main(args)


def _compare(args) -> int:
    from var_jax.benchmarks import compare  # noqa: PLC0415  (imports torch only when run)

    return compare.main(args)


def main(argv=None) -> int:
    return cli.run(lambda: (lambda a: a.run(a))(build_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
