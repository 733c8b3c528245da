"""`python -m var_jax.bench compare`: var_jax against the official PyTorch code, in one process.

Both sides build the same architecture with random weights (the speed does not depend on them):
`--depth D` the official VAR-dD at 256 px with the official `vae_ch160v4096z32` tokenizer
(d36: 512 px), `--config FILE` the VAR of a var_jax training config (e.g. configs/tiny.py, the
built-in default: depth 4, width 128; its own small tokenizer has a layout the official VQVAE
class cannot build, so only `train` is comparable there), `--tiny` a small official-layout pair
for tests. Same batch, dtype, device (CPU; CUDA when torch sees one and JAX runs on a GPU) and
CPU threads: `torch.set_num_threads(N)`, and when N is below the cores this process may use,
every thread of the process (XLA's pool included) is pinned to N cores. On a machine that other
jobs load, torch's multi-thread (OpenMP) pool slows down far more than XLA's when its threads
get descheduled: `--threads 1` is the fair setting there (docs/benchmarks.md shows both).

For each workload both sides first prepare (compile / allocate) and run `--warmup` untimed
runs, then the timed runs alternate, var_jax, official, var_jax, official, ..., so that load on
the machine hits both alike; each run ends when its results are on the host side
(`block_until_ready`, `torch.cuda.synchronize`). The table gives each side's median and the
speed ratio var_jax / official (> 1: var_jax is faster). What each workload runs on the official
side, and why it is the counterpart of the var_jax one, is in `official.py`.

`interleaved` and `table` know nothing of JAX or torch: a side is any object with `name`,
`prepare(workload) -> callable` and `release()`, which is how the tests exercise them.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from var_jax.benchmarks.official import NotComparable, OfficialSide, import_official
from var_jax.benchmarks.sample import decode
from var_jax.benchmarks.timing import device_kind, num
from var_jax.benchmarks.train import (
    is_tokenizer_config,
    load_config,
    one_device_config,
    tokenizer_config,
    train_step_program,
)
from var_jax.models import VARConfig, VQVAEConfig, create, vqvae_config
from var_jax.sampling import generate
from var_jax.testing import TINY_OFFICIAL_VQ
from var_jax.training import configs, var_task

WORKLOADS = ('train', 'train_encode', 'train_tokens', 'sample', 'encode', 'decode')
WHAT = {
    'train': 'VAR train step (forward, cross-entropy, backward, AdamW) on given tokens',
    'train_encode': 'the same, with the tokenizer encode of the images in the step',
    'train_tokens': "var_jax's step from pre-tokenized data (no encoder) against the official step with the encode",
    'sample': 'class-conditional sampling (guidance, top-k, top-p) and decode',
    'encode': 'tokenizer encode: images -> tokens of every scale',
    'decode': 'tokenizer decode: f_hat -> images',
}


@dataclasses.dataclass
class Spec:
    """What both sides build and run."""

    name: str
    config: Any  # var_jax training config, resolved for one device at `batch`
    vq: VQVAEConfig
    var: VARConfig
    batch: int
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    seed: int = 0

    def describe(self) -> str:
        c, vq = self.var, self.vq
        return (f'{self.name}: VAR depth {c.depth}, width {c.C}, {c.H} heads, {c.L} tokens, V {c.vocab_size}; '
                f'tokenizer ch {vq.ch} x {tuple(vq.ch_mult)}, {vq.image_size} px; batch {self.batch}, {c.dtype}')


def make_spec(*, depth: int = 16, config: str | None = None, tiny: bool = False, batch: int = 2,
              dtype: str = 'float32', cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, seed: int = 0) -> Spec:
    if tiny:
        c = configs.var_recipe(depth=2, batch_size=batch, epochs=1, tblr=1e-4, alng=1e-5, wpe=0.1)
        c.model.update(patch_nums=TINY_OFFICIAL_VQ.patch_nums, num_classes=10)
        vq, name = TINY_OFFICIAL_VQ, '--tiny'
    elif config:
        c = load_config(config)
        if is_tokenizer_config(c):
            raise ValueError(f'--config {config} is a tokenizer config; compare times VAR: give a VAR training config')
        configs.check(c, 'var')
        vq, name = tokenizer_config(c), config
    else:
        if depth < 1:
            raise ValueError(f'--depth must be >= 1, got {depth}')
        c = configs.var_recipe(depth=depth, batch_size=batch, epochs=1, tblr=1e-4, alng=1e-5, wpe=0.1,
                                  image_size=512 if depth == 36 else 256)
        vq, name = vqvae_config(patch_nums=configs.patch_nums_of(c)), f'd{depth}'
    c.model.dtype = dtype
    c = one_device_config(c, batch, vq)
    var = var_task.var_config(c, vq)
    top_k = min(top_k, var.vocab_size)  # the official top-k fails above V
    return Spec(name, c, vq.replace(dtype=dtype), var, batch, cfg, top_k, top_p, seed)


# ---------------------------------------------------------------------------- var_jax side
@nnx.jit
def _encode(vqvae, images):
    return vqvae.quantize.tokenize(vqvae.encode(images))[0]


class JaxSide:
    """var_jax's own entry points on the first device, one timed callable per workload."""

    name = 'var_jax'

    def __init__(self, spec: Spec):
        self.spec, self._models, self._held = spec, None, None

    def _pair(self):
        if self._models is None:  # built once for sample / encode / decode
            self._models = create(self.spec.vq, seed=0), create(self.spec.var, seed=1)
        return self._models

    def prepare(self, workload: str) -> Callable[[], None]:
        s = self.spec
        key = jax.random.key(s.seed)
        if workload in ('train', 'train_encode', 'train_tokens'):
            # the frozen tokenizer encodes in float32 in training (as the official trainer, outside autocast)
            step, state, data, frozen, _ = train_step_program(
                s.config, s.batch, None, workload == 'train_tokens', tokenizer=s.vq.replace(dtype='float32'),
                var_alone=workload == 'train', with_state=True)
            held = self._held = {'state': state}

            def train():
                held['state'], m = step(held['state'], data, frozen)
                jax.block_until_ready(m['loss'])
            return train
        vq, var = self._pair()
        if workload == 'sample':
            labels = np.arange(s.batch, dtype=np.int32) % s.var.num_classes
            return lambda: jax.block_until_ready(
                generate.sample(var, vq, labels, key, cfg=s.cfg, top_k=s.top_k, top_p=s.top_p)[0])
        if workload == 'encode':
            size = s.vq.image_size
            images = jax.random.uniform(key, (s.batch, size, size, 3), minval=-1.0, maxval=1.0)
            return lambda: jax.block_until_ready(_encode(vq, images))
        if workload == 'decode':
            pn = s.vq.patch_nums[-1]
            f_hat = jax.random.uniform(key, (s.batch, pn, pn, s.vq.z_channels), minval=-1.0, maxval=1.0)
            return lambda: jax.block_until_ready(decode(vq, f_hat))
        raise ValueError(f'unknown workload {workload!r}')

    def release(self):
        self._held = None
        gc.collect()

    def close(self):
        self._models = None
        self.release()

    def describe(self) -> str:
        return f'var_jax with jax {jax.__version__} ({device_kind()}); jitted (compile time excluded)'

    def info(self) -> dict:
        d = jax.devices()[0]
        return {'jax': jax.__version__, 'device': f'{d.platform} {d.device_kind}'}


# ---------------------------------------------------------------------------- the machinery
@dataclasses.dataclass
class Result:
    workload: str
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # side -> timed runs (s)
    note: str = ''  # why it was not compared (not comparable, failed)
    failed: bool = False

    def median(self, side: str) -> float:
        return statistics.median(self.times[side])

    def ratio(self, fast: str, base: str) -> float:
        """Speed of `fast` over speed of `base` (> 1: `fast` is faster)."""
        return self.median(base) / self.median(fast)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split())
    return f'{type(e).__name__}: {text[:200]}' if text else type(e).__name__


def interleaved(sides: list, workloads, warmup: int, repeats: int, log: Callable[[str], None] = _say,
                deadline: float | None = None) -> list[Result]:
    """Time every workload on every side: prepare all, warm-ups, then timed runs alternating
    side by side (A, B, A, B, ...). A side that cannot run a workload (`NotComparable`) or fails
    (any exception, traceback on stderr) leaves a note in its row; the other workloads still run.
    `deadline` (time.monotonic()): stop taking more timed runs once it is passed (at least one each)."""
    results = []
    for w in workloads:
        r = Result(w)
        results.append(r)
        try:
            fns = {}
            for side in sides:
                log(f'{w}: preparing {side.name} ...')
                fns[side.name] = side.prepare(w)
            for i in range(warmup):
                for side in sides:
                    log(f'{w}: {side.name} warm-up {i + 1}/{warmup} ...')
                    fns[side.name]()
            r.times = {side.name: [] for side in sides}
            for i in range(repeats):
                for side in sides:
                    t0 = time.perf_counter()
                    fns[side.name]()
                    r.times[side.name].append(time.perf_counter() - t0)
                log(f'{w}: run {i + 1}/{repeats}: ' + ', '.join(f'{k} {v[-1]:.3g} s' for k, v in r.times.items()))
                if deadline is not None and time.monotonic() > deadline:
                    log(f'{w}: time budget reached after {i + 1} timed runs')
                    break
        except NotComparable as e:
            r.times, r.note = {}, f'not comparable: {e}'
        except Exception as e:  # noqa: BLE001 - record it, go on with the next workload
            traceback.print_exc(file=sys.stderr)
            r.times, r.note, r.failed = {}, f'failed: {_one_line(e)}', True
        finally:
            for side in sides:
                side.release()
    return results


def table(results: list[Result], fast: str, base: str, batch: int) -> str:
    """Markdown: per workload each side's median seconds and images/s, and the speed ratio."""
    lines = [f'| workload | {fast} s | {base} s | {fast} img/s | {base} img/s | {fast} / {base} speed |',
             '|---|---:|---:|---:|---:|---:|']
    for r in results:
        if not r.times:
            lines.append(f'| {r.workload} | {r.note} | | | | |')
            continue
        a, b = r.median(fast), r.median(base)
        lines.append(f'| {r.workload} | {num(a)} | {num(b)} | {num(batch / a)} | {num(batch / b)} | '
                     f'{r.ratio(fast, base):.2f}x |')
    return '\n'.join(lines)


def results_json(results: list[Result], fast: str, base: str, batch: int) -> list[dict]:
    out = []
    for r in results:
        row: dict[str, Any] = {'workload': r.workload, 'what': WHAT.get(r.workload, ''), 'seconds': r.times}
        if r.times:
            row.update(median_s={k: r.median(k) for k in r.times}, img_per_s={k: batch / r.median(k) for k in r.times},
                       speed_ratio=r.ratio(fast, base))
        if r.note:
            row['note'] = r.note
        out.append(row)
    return out


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically: a temporary file beside it, renamed (no partial file on failure)."""
    p = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{p.name}.', dir=p.parent)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, p)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def parse_workloads(text: str) -> list[str]:
    out = [w.strip() for w in text.split(',') if w.strip()]
    bad = [w for w in out if w not in WORKLOADS]
    if bad or not out:
        raise ValueError(f'--workloads: unknown {",".join(bad) or "(none given)"}; choose from {",".join(WORKLOADS)}')
    return list(dict.fromkeys(out))


def check_json_path(path: str | None) -> None:
    if path and not pathlib.Path(path).expanduser().resolve().parent.is_dir():
        raise ValueError(f'--json {path}: its directory does not exist')


# ---------------------------------------------------------------------------- CPU threads
def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else list(range(os.cpu_count() or 1))


class PinnedCores:
    """Pin every thread of this process (XLA's and torch's pools included) to the first n usable
    cores; undone by `restore`. Threads started later inherit it from the thread that starts them."""

    def __init__(self, n: int):
        cores = usable_cores()
        self.saved: dict[int, set[int]] = {}
        if n >= len(cores) or not hasattr(os, 'sched_setaffinity'):
            return
        for tid in map(int, os.listdir('/proc/self/task')):
            try:
                self.saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cores[:n])
            except OSError:  # the thread ended meanwhile
                pass

    def restore(self):
        for tid, cores in self.saved.items():
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:
                pass


# ---------------------------------------------------------------------------- the command
def main(args) -> int:
    # on a GPU JAX would take 75 % of its memory up front and leave torch little; this only acts
    # before JAX starts its backend (the command line), which is when it matters
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    workloads = parse_workloads(args.workloads)
    if args.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {args.batch}')
    if args.warmup < 1 or args.repeats < 1:
        raise ValueError('--warmup and --repeats must be >= 1')
    check_json_path(args.json)
    cores = usable_cores()
    threads = args.threads or len(cores)
    if not 1 <= threads <= len(cores):
        raise ValueError(f'--threads must be in [1, {len(cores)}] (the cores this process may use), got {threads}')
    torch, _, _ = import_official(args.official)  # the one-line errors before anything is built
    # pinned before JAX starts its CPU backend: XLA sizes its thread pools by the cores it may use
    # then (pinned afterwards, its larger pools would share the fewer cores)
    pinned = PinnedCores(threads)
    sides = []
    try:
        platform = jax.devices()[0].platform
        if platform == 'gpu' and not torch.cuda.is_available():
            raise ValueError('JAX runs on a GPU but this torch has no CUDA: both sides must run on the same device '
                             '(install a CUDA build of torch, or run JAX on the CPU: JAX_PLATFORMS=cpu)')
        if platform not in ('cpu', 'gpu'):
            raise ValueError(f'compare runs on a CPU or an NVIDIA GPU (torch\'s devices); JAX runs on {platform}')
        device = 'cuda' if platform == 'gpu' else 'cpu'
        if device == 'cuda':  # --threads is about CPU compute; the GPU's host side keeps every core
            pinned.restore()
            pinned = PinnedCores(len(cores))
        spec = make_spec(depth=args.depth, config=args.config, tiny=args.tiny, batch=args.batch, dtype=args.dtype,
                         cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        _say(f'building {spec.describe()} on both sides ...')
        sides = [JaxSide(spec), OfficialSide(args.official, spec, device, threads)]
        deadline = time.monotonic() + args.budget if getattr(args, 'budget', None) else None
        results = interleaved(sides, workloads, args.warmup, args.repeats, deadline=deadline)
        jax_side, official = sides
        header = [f'# compare: {spec.describe()}',
                  f'# {jax_side.describe()}',
                  f'# {official.describe()}',
                  f'# device {device}; CPU threads: torch {threads}, XLA '
                  + ('pinned to the same cores' if pinned.saved else f'all {len(cores)} cores of this process'),
                  f'# sampling: cfg {spec.cfg:g}, top-k {spec.top_k}, top-p {spec.top_p:g}; median of '
                  f'{args.repeats} timed runs per side after {args.warmup} warm-up, interleaved '
                  f'(var_jax, official, var_jax, ...); speed ratio = var_jax img/s / official img/s '
                  f'(> 1: var_jax faster)']
        print('\n'.join(header))
        print(table(results, 'var_jax', 'official', spec.batch))
        print('\n'.join(f'- {r.workload}: {WHAT[r.workload]}' for r in results))
        if args.json:
            write_json(args.json, {
                'spec': spec.describe(), 'batch': spec.batch, 'dtype': spec.var.dtype, 'device': device,
                'threads': threads, 'warmup': args.warmup, 'repeats': args.repeats,
                'sampling': {'cfg': spec.cfg, 'top_k': spec.top_k, 'top_p': spec.top_p},
                'var_jax': jax_side.info(), 'official': official.info(),
                'results': results_json(results, 'var_jax', 'official', spec.batch)})
        return 1 if any(r.failed for r in results) else 0
    finally:
        for side in sides:
            side.close()
        pinned.restore()
