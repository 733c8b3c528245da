"""`python -m var_jax.bench sample`: class-conditional sampling throughput on one device.

The transformer (`generate.generate_fhat`: all scales, KV cache, guidance with the batch doubled,
top-k/top-p) and the tokenizer decode (`vqvae.decode`) are timed separately, as images per
second for each batch size. Compilation is excluded: each part is first run `warmup` times (the
first run compiles), then `repeats` timed runs, each ended by `block_until_ready`; the table gives
the median. `--model` builds random weights (the speed does not depend on them): d16..d30 are the
official 256 px models, d36 the 512 px one, each with the official tokenizer; `tiny` is the 8 px
pair of `var_jax.testing`, for smoke tests.
"""
from __future__ import annotations

import statistics
import sys

import jax
import numpy as np
from flax import nnx

from var_jax.benchmarks.timing import check_runs, device_kind, int_list, num, timed
from var_jax.io.checkpoint import merge_params, open_checkpoint
from var_jax.models import VARConfig, VQVAEConfig, create, var_config, vqvae_config
from var_jax.sampling import generate
from var_jax.sampling.settings import check_settings
from var_jax.testing import TINY_VAR, TINY_VQ

MODELS = ('tiny', 'd16', 'd20', 'd24', 'd30', 'd36')


def preset(name: str, dtype: str) -> tuple[VQVAEConfig, VARConfig]:
    """`tiny` or `dN` (the official VAR-dN with its tokenizer) in the compute dtype `dtype`."""
    if name == 'tiny':
        vq, var = TINY_VQ, TINY_VAR
    else:
        var = var_config(int(name[1:]))
        vq = vqvae_config(patch_nums=var.patch_nums)
    return vq.replace(dtype=dtype), var.replace(dtype=dtype)


def build_models(args):
    """-> (vqvae, var, description) from --model (random weights) or --checkpoint."""
    if args.checkpoint:
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
def decode(vqvae, f_hat):
    """f_hat -> images in [0, 1], the decode that sampling ends with."""
    return (vqvae.decode(f_hat) + 1) / 2


def main(args) -> int:
    """The `bench sample` subcommand: the table on stdout, progress on stderr."""
    s = check_settings(args.cfg, args.top_k, args.top_p, False)
    batches = int_list(args.batch, '--batch')
    check_runs(args.warmup, args.repeats)
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
        dec_first, dec, _ = timed(lambda: decode(vqvae, f_hat), args.warmup, args.repeats)
        g, d = statistics.median(gen), statistics.median(dec)
        rows.append((b, g, d, gen_first - g, dec_first - d))
    print(f'# sample: {what}, depth {c.depth}, {vqvae.config.image_size} px, {c.L} tokens, dtype {c.dtype}')
    print(f'# device: {device_kind()} (1 of {jax.device_count()}); {s.describe()}; '
          f'median of {args.repeats} after {args.warmup} warm-up')
    print('| batch | transformer s | decode s | transformer img/s | decode img/s | total img/s | compile s (approx) |')
    print('|---:|---:|---:|---:|---:|---:|---:|')
    for b, g, d, gc, dc in rows:
        print(f'| {b} | {num(g)} | {num(d)} | {num(b / g)} | {num(b / d)} | {num(b / (g + d))} | {num(gc + dc)} |')
    return 0
