"""`python -m var_jax.bench train`: the train step of a training config, timed on one device.

With a VAR config: the jitted step of `var_jax.train` (tokenizer encode, VAR forward and
backward, AdamW) on random images, with random weights for the config's tokenizer (its
`tokenizer.train.model`, else the official one). `--baseline autodiff_norm` also times the same
step with JAX's autodiff of LayerNorm instead of the hand-written backward
(`models.var.layer_norm`), `--baseline autodiff_dense` with autodiff's weight gradients of the
Linears instead of `models.var.dense`'s, and reports the ratio, both measured in the same process, interleaved
run by run so that load on the machine hits both alike; `--baseline xla_attention` likewise
against `model.attention='xla'`. `--tokens` times the step of pre-tokenized training
(`data.source='tokens'`: random token batches, no encoder) against the step from images. With a
tokenizer config (configs/tokenizer*.py): the step of `var_jax.train_tokenizer` (encode,
multi-scale quantization, decode, the config's losses and discriminator, AdamW, codebook usage
and dead-code re-seeding).

`train_step_program` builds the step the same way for `compare` and `device`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from unittest import mock

import jax
import numpy as np

from var_jax.benchmarks.timing import check_runs, device_kind, int_list, num, op_profile
from var_jax.data import builtin
from var_jax.models import VQVAEConfig, create, vqvae_config
from var_jax.models import var as var_module
from var_jax.parallel import sharding
from var_jax.training import configs, loop, tokenizer_task, var_task


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


def one_device_config(config, batch: int, vq_cfg: VQVAEConfig | None = None):
    """-> the config resolved for one device at this batch size (every workload here runs on one)."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch
    config.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    if not is_tokenizer_config(config):
        if not config.model.num_classes:
            config.model.num_classes = builtin.NUM_CLASSES if config.data.source == 'builtin' else 1000
        config.data.image_size = (vq_cfg or tokenizer_config(config)).image_size
    return config


def _given_tokens(mb, vq):
    """The step's teacher-forcing input and targets read from the batch (`x_in`, `target`) instead
    of encoding images, i.e. VAR alone (`compare`'s `train` workload)."""
    return mb['x_in'], mb['target']


# `--baseline` choices that trace the step with one function of models/var.py swapped for JAX's autodiff
AUTODIFF_BASELINES = {'autodiff_norm': ('layer_norm', var_module.layer_norm_autodiff),
                      'autodiff_dense': ('dense_matmul', var_module.dense_autodiff)}


def train_step_program(config, batch: int, baseline: str | None = None, from_tokens: bool = False, *,
                       tokenizer: VQVAEConfig | None = None, var_alone: bool = False, with_state: bool = False):
    """-> (compiled step, initial state, one batch, frozen params, model description).

    The step is the one `var_jax.train` (a VAR config) or `var_jax.train_tokenizer` (a tokenizer
    config) runs, built by the same `loop.setup` / `loop.compile_step`. `tokenizer`: the
    VQVAE a VAR config encodes with (default `tokenizer_config`). `from_tokens`: the step of
    pre-tokenized training, which returns no state of its own unless `with_state` (`bench train
    --tokens` runs it on the image step's). `var_alone`: the VAR step without
    the encode, fed random teacher-forcing input and targets (jitted on one device as `loop.setup`
    does, with the batch's two extra arrays)."""
    config = one_device_config(config, batch, tokenizer)
    num_classes = 1
    if from_tokens:  # the step of data.source='tokens': token batches, no encoder (var_jax/data/token_writer.py)
        config.data.update(source='tokens', path='(random tokens)')
    if is_tokenizer_config(config):
        vq_cfg = configs.vqvae_model_config(config.model)
        config.data.image_size = vq_cfg.image_size
        task = tokenizer_task.builder(config, tempfile.gettempdir())(config, None)
        losses = [f'{k} {config.loss[k]:g}' for k in ('l1', 'l2', 'lpips', 'gan') if config.loss[k]]
        what = (f'tokenizer ch {vq_cfg.ch} x {tuple(vq_cfg.ch_mult)}, V {vq_cfg.vocab_size}, {vq_cfg.image_size} px, '
                f'{vq_cfg.num_scales} scales, loss {" + ".join(losses)}, {vq_cfg.dtype}')
    else:
        num_classes = config.model.num_classes
        vq_cfg = tokenizer or tokenizer_config(config)
        task = var_task.build(config, tokenizer=var_task.given_tokenizer(create(vq_cfg, seed=0)),
                              teacher_forcing=_given_tokens if var_alone else None)
        c = task.model_configs['var']
        what = (f'VAR depth {c.depth} width {c.C}, {c.L} tokens, {c.dtype}; ' +
                ('no tokenizer (given tokens)' if var_alone else f'tokenizer ch {vq_cfg.ch}, {vq_cfg.image_size} px'))
    size = vq_cfg.image_size
    s = loop.setup(task, config, dataset_size=int(config.data.get('size_hint', loop.IMAGENET_TRAIN)))
    rng = np.random.default_rng(0)
    spec = task.batch_spec  # of config.batch_size, which is `batch` (one_device_config)
    data = {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)} if 'image' in spec else \
        {'tokens': rng.integers(0, vq_cfg.vocab_size, spec['tokens'].shape).astype(spec['tokens'].dtype)}
    data |= {'label': (np.arange(batch) % num_classes).astype(np.int32),
             'skipped': np.zeros(batch, np.int32)}
    if var_alone:
        c = task.model_configs['var']
        data['image'] = np.zeros((batch, 1, 1, 3), np.uint8)  # unread
        data['x_in'] = rng.standard_normal((batch, c.L - c.patch_nums[0] ** 2, c.cvae), dtype=np.float32)
        data['target'] = rng.integers(0, c.vocab_size, (batch, c.L), dtype=np.int32)
        data = jax.device_put(data, s.batch_shardings['label'])
        state = s.init_fn(jax.random.key(0))
        with sharding.use_mesh(s.mesh):
            compiled = jax.jit(loop._guarded(task, s.tx), donate_argnums=0).lower(state, data, s.frozen).compile()
        return compiled, state, data, s.frozen, what
    patch = (mock.patch.object(var_module, *AUTODIFF_BASELINES[baseline]) if baseline in AUTODIFF_BASELINES
             else contextlib.nullcontext())
    with patch:  # looked up while tracing (the model is built in the step), so only this program uses it
        compiled, _ = loop.compile_step(task, s)
    data = {k: jax.device_put(v, s.batch_shardings[k]) for k, v in data.items()}
    # from tokens: no state of its own; it runs on the image step's (same structure), which halves
    # the memory of the comparison (two d16 states did not fit a 23 GB machine)
    state = None if from_tokens and not with_state else s.init_fn(jax.random.key(0))
    return compiled, state, data, s.frozen, what


def main(args) -> int:
    """The `bench train` subcommand: the table on stdout, progress on stderr."""
    batches = int_list(args.batch, '--batch')
    check_runs(args.warmup, args.repeats)
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
    if args.profile < 0:
        raise ValueError(f'--profile must be >= 0, got {args.profile}')
    rows, profiles, what = [], [], ''
    for b in batches:
        progs, states, datas = {}, {}, {}
        for v in variants:
            print(f'batch {b}: compiling the {v} ...', file=sys.stderr, flush=True)
            c = config
            if v == 'baseline' and args.baseline == 'xla_attention':  # the same step with the default attention
                c = config.copy_and_resolve_references()
                c.model.attention = 'xla'
            progs[v], states[v], datas[v], frozen, what = train_step_program(
                c, b, args.baseline if v == 'baseline' else None, v == 'tokens')
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
        if args.profile:
            profiles.append((b, _profile_step(progs['step'], states, datas['step'], frozen, args.profile)))
    print(f'# train: {args.config}: {what}')
    print(f'# device: {device_kind()} (1 of {jax.device_count()}); '
          f'median of {args.repeats} steps after {args.warmup} warm-up')
    if args.tokens:
        print('| batch | step from images ms | img/s | step from tokens ms | img/s | images / tokens |')
        print('|---:|---:|---:|---:|---:|---:|')
        for b, t in rows:
            print(f'| {b} | {num(t["step"] * 1e3)} | {num(b / t["step"])} | {num(t["tokens"] * 1e3)} | '
                  f'{num(b / t["tokens"])} | {t["step"] / t["tokens"]:.2f}x |')
    elif args.baseline:
        print(f'| batch | step ms | img/s | baseline ({args.baseline}) ms | speed-up |')
        print('|---:|---:|---:|---:|---:|')
        for b, t in rows:
            print(f'| {b} | {num(t["step"] * 1e3)} | {num(b / t["step"])} | {num(t["baseline"] * 1e3)} | '
                  f'{t["baseline"] / t["step"]:.2f}x |')
    else:
        print('| batch | step ms | img/s |')
        print('|---:|---:|---:|')
        for b, t in rows:
            print(f'| {b} | {num(t["step"] * 1e3)} | {num(b / t["step"])} |')
    for b, table in profiles:
        print(f'\n{table}'.replace('BATCH', str(b)))
    return 0


def _profile_step(step, states, data, frozen, top: int) -> str:
    """One more step of `step` under the profiler -> a markdown table of its `top` slowest ops."""
    def run():
        states['step'], m = step(states['step'], data, frozen)
        return m['loss']

    total, ops = op_profile(run)
    lines = [f'# profile of one step at batch BATCH: {num(total)} s in XLA ops; the {min(top, len(ops))} slowest',
             '| op | s | share | calls |', '|---|---:|---:|---:|']
    lines += [f'| {name} | {num(t)} | {100 * t / total:.1f} % | {c} |' for name, t, c in ops[:top]]
    return '\n'.join(lines)
