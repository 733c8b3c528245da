"""`python -m var_jax.bench device`: a one-shot accelerator check that ends within 8 minutes.

    python -m var_jax.bench device [--out DIR] [--official DIR] [--budget 450] [--smoke]

Parts, in this order, each in its own process under its own time budget (so that a compile that
runs long, an out-of-memory error or a crash costs that part only; the row says what happened and
the rest still run):

- `peak`: a chain of bf16 matmuls (8192 x 8192) jitted in one program -> the measured bf16 matmul
  peak, the denominator of MFU below (not the vendor's number).
- `train_d16`, `train_d20`: the `var_jax.train` step of VAR-d16 / d20 in bf16 (tokenizer encode,
  forward, backward, AdamW; `benchmarks.train.train_step_program`, i.e. what `bench train`
  times), batch 32 on one device -> img/s, achieved TFLOP/s of the VAR (`metrics.var_flops_per_image`: matmuls and
  attention, forward + backward; the tokenizer encode is not counted) and MFU = achieved / peak.
- `sample_d16`: `generate.sample` of VAR-d16 in bf16 (cfg 1.5, top-k 900, top-p 0.96, decode
  included) at batch 1, 16 and 64 -> img/s (each batch size compiles once, excluded).
- `memory_d30`: lower + compile (nothing allocated) the VAR-d30 bf16 train step at batch 16 per
  device -> `compiled.memory_analysis()`: arguments + outputs + temporaries - aliased, per device.
- `official`: `compare` (d16, bf16, batch 16: train and sample) against the official PyTorch code on
  the same device, when `--official DIR` is given.

The parent process never touches the accelerator (it would hold its memory): it starts each part
as `python -m var_jax.bench device --part NAME`, kills it when its budget runs out, and reads the
part's JSON (`DIR/parts/NAME.json`, written after every row, so a part cut short keeps the rows it
finished). The table goes to stdout, the children's progress to stderr, everything to
`DIR/device_check.json`. `--smoke` runs the same code path on the CPU with tiny models and a
180 s budget (CI; the tests give it more on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.benchmarks import compare, train
from var_jax.models import create, var_config, vqvae_config
from var_jax.sampling import generate
from var_jax.testing import TINY_VAR, TINY_VQ
from var_jax.training import configs, loop, var_task
from var_jax.utils import metrics

PARTS = ('peak', 'train_d16', 'train_d20', 'sample_d16', 'memory_d30', 'official')
# seconds per part for the full check (450 s in all); `official` gets what is left (120 s).
# The children start within these shares, so the whole check ends within 8 minutes.
CAPS = {'peak': 30, 'train_d16': 75, 'train_d20': 75, 'sample_d16': 90, 'memory_d30': 60, 'official': 600}
SMOKE_CAPS = {'peak': 20, 'train_d16': 30, 'train_d20': 30, 'sample_d16': 30, 'memory_d30': 30, 'official': 60}
BUDGET, SMOKE_BUDGET = 450.0, 180.0
MIN_START = {'full': 20.0, 'smoke': 5.0}  # a part with less time than this left is skipped
TRAIN_BATCH, SAMPLE_BATCHES, MEMORY_BATCH, COMPARE_BATCH = 32, (1, 16, 64), 16, 16
SMOKE_SAMPLE_BATCHES = (2,)
# --smoke's tokenizer: `bench sample --model tiny`'s (8 px, 4 scales), cheap to compile
SMOKE_VQ = TINY_VQ


# ---------------------------------------------------------------------------- the parent
def main(args) -> int:
    if args.part:
        return run_part(args)
    out = pathlib.Path(args.out or os.environ.get('OUT') or 'device_check')
    if out.exists() and not out.is_dir():
        raise ValueError(f'--out {out}: not a directory')
    if args.official and not pathlib.Path(args.official).is_dir():
        raise ValueError(f'--official: no such directory: {args.official}')
    default = SMOKE_BUDGET if args.smoke else BUDGET
    budget = args.budget if args.budget is not None else default
    if budget <= 0:
        raise ValueError(f'--budget must be > 0 seconds, got {budget}')
    (out / 'parts').mkdir(parents=True, exist_ok=True)
    caps, mode = (SMOKE_CAPS, 'smoke') if args.smoke else (CAPS, 'full')
    t_start = time.monotonic()
    deadline = t_start + budget
    here = str(pathlib.Path(__file__).resolve().parents[2])  # the children import this var_jax
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, *filter(None, [os.environ.get('PYTHONPATH')])]))
    if args.smoke:
        env['JAX_PLATFORMS'] = 'cpu'
    parts = {}
    for name in PARTS:
        path = out / 'parts' / f'{name}.json'
        path.unlink(missing_ok=True)
        left = deadline - time.monotonic()
        if name == 'official' and not args.official:
            parts[name] = {'status': 'not run: no --official DIR given', 'rows': []}
            continue
        if left < MIN_START[mode]:
            parts[name] = {'status': f'skipped: {max(left, 0):.0f} s of the budget left', 'rows': []}
            continue
        part_budget = min(caps[name] * budget / default, left)  # --budget scales every part's share
        cmd = [sys.executable, '-m', 'var_jax.bench', 'device', '--part', name, '--out', str(out),
               '--part_budget', f'{part_budget:.1f}']
        if args.smoke:
            cmd.append('--smoke')
        if name == 'official':
            cmd += ['--official', args.official]
        peak = parts.get('peak', {}).get('tflops')
        if peak:
            cmd += ['--peak_tflops', str(peak)]
        print(f'== {name}: budget {part_budget:.0f} s', file=sys.stderr, flush=True)
        child_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE='false') if name == 'official' else env
        t0 = time.monotonic()
        try:
            code = _run_child(cmd, child_env, part_budget)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        part = _read(path)
        if code is None:
            part['status'] = f'timed out after {took:.0f} s (budget {part_budget:.0f} s)'
        elif code != 0 and 'error' not in part:
            part['status'] = f'failed: exit code {code}'
        elif 'error' in part:
            part['status'] = f'failed: {part["error"]}'
        else:
            part['status'] = 'ok'
        part['seconds'] = round(took, 1)
        parts[name] = part
    total = time.monotonic() - t_start
    device = parts.get('peak', {}).get('device', 'unknown device')
    lines = [f'# device check{" (smoke: CPU, tiny models)" if args.smoke else ""}: {device}; '
             f'{total:.0f} s of a {budget:.0f} s budget',
             '| check | setting | result | notes |', '|---|---|---:|---|']
    for name in PARTS:
        p = parts[name]
        for row in p.get('rows', []):
            lines.append(f'| {row["check"]} | {row["setting"]} | {row["result"]} | {row.get("notes", "")} |')
        if p['status'] != 'ok':
            lines.append(f'| {name} | | {p["status"]} | |')
    print('\n'.join(lines))
    compare.write_json(out / 'device_check.json', {'device': device, 'smoke': bool(args.smoke), 'budget_s': budget,
                                                   'seconds': round(total, 1), 'parts': parts})
    print(f'wrote {out / "device_check.json"}', file=sys.stderr)
    return 0


def _run_child(cmd, env, timeout: float) -> int:
    """Run a part; its output (stdout too: only the parent prints the table) goes to our stderr."""
    try:
        err = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr is not a file (captured, e.g. in tests)
        err = None
    if err is not None:
        return subprocess.run(cmd, stdout=err, stderr=err, env=env, timeout=timeout).returncode
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        sys.stderr.write((e.output or b'').decode(errors='replace'))
        raise
    sys.stderr.write(r.stdout.decode(errors='replace'))
    return r.returncode


def _read(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {'rows': []}


# ---------------------------------------------------------------------------- one part (a child)
class Part:
    """The JSON of one part, rewritten after every row."""

    def __init__(self, args):
        self.path = pathlib.Path(args.out) / 'parts' / f'{args.part}.json'
        self.data: dict = {'part': args.part, 'rows': []}
        self.deadline = time.monotonic() + float(args.part_budget or 1e9)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, check: str, setting: str, result: str, notes: str = '', **values):
        self.data['rows'].append({'check': check, 'setting': setting, 'result': result, 'notes': notes,
                                  'values': values})
        self.save()

    def save(self):
        compare.write_json(self.path, self.data)


def run_part(args) -> int:
    if args.part not in PARTS:
        raise ValueError(f'--part must be one of {", ".join(PARTS)}')
    part = Part(args)
    part.save()
    try:
        d = jax.devices()[0]
        part.data['device'] = (f'{d.device_kind} ({d.platform}, 1 of {jax.device_count()}), jax {jax.__version__}')
        part.save()
        PART_FNS[args.part](args, part)
    except Exception as e:  # noqa: BLE001 - recorded in the part's row; the parent goes on
        traceback.print_exc(file=sys.stderr)
        part.data['error'] = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
        part.save()
        return 1
    part.save()
    return 0


def _timed_loop(fn, part: Part, max_runs: int, min_runs: int = 2, reserve: float = 0.0) -> list[float]:
    """Run `fn` (blocking) up to `max_runs` times, fewer when the part's time runs out."""
    times = []
    while len(times) < max_runs and (len(times) < min_runs or part.left() > reserve + 2 * (times[-1] if times else 0)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def part_peak(args, part: Part):
    n, chain = (256, 4) if args.smoke else (8192, 10)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n ** 0.5).astype(jnp.bfloat16)

    @jax.jit
    def matmuls(x, w):  # dependent products: one program, no dispatch gaps
        return jax.lax.fori_loop(0, chain, lambda i, h: jnp.dot(h, w), x)

    jax.block_until_ready(matmuls(a, b))
    times = _timed_loop(lambda: jax.block_until_ready(matmuls(a, b)), part, 10, min_runs=3)
    t = statistics.median(times)
    tflops = 2 * n ** 3 * chain / t / 1e12
    part.data['tflops'] = tflops
    part.add('matmul peak', f'bf16 ({n} x {n}) @ ({n} x {n}), {chain} chained in one program',
             f'{tflops:,.1f} TFLOP/s', f'median of {len(times)}; the MFU denominator below', tflops=tflops)


def _var_config(args, depth: int, batch: int):
    c = configs.var_recipe(depth=depth, batch_size=batch, epochs=1, tblr=1e-4, alng=1e-5, wpe=0.1)
    c.model.dtype = 'bfloat16'
    if args.smoke:  # tiny: 4 scales, 8 px; depth 1 / 2 / 3 stand in for 16 / 20 / 30
        vq = SMOKE_VQ
        c.model.update(depth=max(1, depth // 10), width=64, num_heads=1, patch_nums=vq.patch_nums, num_classes=10)
        return c, vq
    return c, None


def _var_cfg(config, batch: int, vq):
    """The VARConfig the train step of this config builds (no weights)."""
    vq = vq or train.tokenizer_config(config)
    return var_task.var_config(train.one_device_config(config, batch, vq), vq)


def _train(depth: int):
    def run(args, part: Part):
        batch = 4 if args.smoke else TRAIN_BATCH
        config, vq = _var_config(args, depth, batch)
        t0 = time.monotonic()
        step, state, data, frozen, what = train.train_step_program(config, batch, tokenizer=vq)
        holder = {'state': state}

        def one():
            holder['state'], m = step(holder['state'], data, frozen)
            jax.block_until_ready(m['loss'])
        for _ in range(1 if args.smoke else 2):  # the first compiles
            one()
        setup = time.monotonic() - t0
        times = _timed_loop(one, part, 3 if args.smoke else 20)
        t = statistics.median(times)
        c = _var_cfg(config, batch, vq)
        img_s = batch / t
        tflops = metrics.var_flops_per_image(c) * img_s / 1e12
        peak = args.peak_tflops
        mfu = f', MFU {100 * tflops / peak:.1f} % of the measured peak' if peak else ', MFU n/a (no peak measured)'
        part.add(f'train d{depth}' + (' (smoke: tiny)' if args.smoke else ''),
                 f'{c.dtype}, batch {batch}, 1 device; encode + VAR fwd/bwd + AdamW',
                 f'{img_s:,.1f} img/s',
                 f'{t * 1e3:,.1f} ms/step (median of {len(times)}); VAR {tflops:,.1f} TFLOP/s{mfu}; '
                 f'compile + warm-up {setup:.0f} s',
                 img_per_s=img_s, step_s=t, tflops=tflops, mfu=tflops / peak if peak else None, what=what)
    return run


def part_sample(args, part: Part):
    if args.smoke:
        vq = SMOKE_VQ.replace(dtype='bfloat16')
        var = TINY_VAR.replace(depth=1, num_heads=1, dtype='bfloat16')
        batches, name = SMOKE_SAMPLE_BATCHES, 'sample d16 (smoke: tiny)'
    else:
        var = var_config(16, dtype='bfloat16')
        vq = vqvae_config(patch_nums=var.patch_nums, dtype='bfloat16')
        batches, name = SAMPLE_BATCHES, 'sample d16'
    vqvae, model = create(vq, seed=0), create(var, seed=1)
    top_k = min(900, var.vocab_size)
    for b in batches:
        labels = np.arange(b, dtype=np.int32) % var.num_classes
        key = jax.random.key(0)

        def one():
            jax.block_until_ready(generate.sample(model, vqvae, labels, key, cfg=1.5, top_k=top_k, top_p=0.96)[0])
        t0 = time.monotonic()
        one()
        first = time.monotonic() - t0
        times = _timed_loop(one, part, 2 if args.smoke else 5, min_runs=1)
        t = statistics.median(times)
        part.add(name, f'bf16, batch {b}, cfg 1.5, top-k {top_k}, top-p 0.96, decode included', f'{b / t:,.2f} img/s',
                 f'{t:.3g} s per batch (median of {len(times)}); first call (compile) {first:.0f} s',
                 img_per_s=b / t, batch=b, seconds=t)


def part_memory(args, part: Part):
    batch = 2 if args.smoke else MEMORY_BATCH
    config, vq = _var_config(args, 30, batch)
    config = train.one_device_config(config, batch, vq)
    with tempfile.TemporaryDirectory() as tmp:  # dry run: no tokenizer weights, nothing allocated
        tok = var_task.Tokenizer(vq) if vq is not None else var_task.resolve_tokenizer(config, tmp, dry_run=True)
        config.data.image_size = tok.config.image_size
        task = var_task.build(config, tokenizer=tok)
        s = loop.setup(task, config, dataset_size=loop.IMAGENET_TRAIN)
        t0 = time.monotonic()
        compiled, _ = loop.compile_step(task, s)
        took = time.monotonic() - t0
    mem = compiled.memory_analysis()
    c = task.model_configs['var']
    check = f'memory d30{" (smoke: tiny)" if args.smoke else ""}'
    setting = f'{c.dtype} train step, batch {batch} per device, compiled (lower + compile only)'
    if mem is None:
        part.add(check, setting, 'n/a', f'memory_analysis() gives nothing on this backend; compile {took:.0f} s')
        return
    gib = 2 ** 30
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    part.add(check, setting, f'{total / gib:,.2f} GiB',
             f'arguments {mem.argument_size_in_bytes / gib:.2f}, outputs {mem.output_size_in_bytes / gib:.2f}, '
             f'temporaries {mem.temp_size_in_bytes / gib:.2f}, aliased {mem.alias_size_in_bytes / gib:.2f} GiB; '
             f'compile {took:.0f} s', gib=total / gib)


def part_official(args, part: Part):
    out = pathlib.Path(args.out) / 'parts' / 'official_compare.json'
    ns = argparse.Namespace(official=args.official, depth=16, config=None, tiny=bool(args.smoke),
                            batch=2 if args.smoke else COMPARE_BATCH, dtype='float32' if args.smoke else 'bfloat16',
                            threads=None, workloads='train,sample', warmup=1, repeats=5, cfg=1.5, top_k=900,
                            top_p=0.96, seed=0, json=str(out), budget=max(part.left() - 60, 1.0))
    code = compare.main(ns)
    data = json.loads(out.read_text())
    for r in data['results']:
        setting = f'{data["spec"].split(":")[0]}, {data["dtype"]}, batch {data["batch"]}, {data["device"]}'
        if 'speed_ratio' in r:
            ips = r['img_per_s']
            part.add(f'vs official: {r["workload"]}', setting, f'{r["speed_ratio"]:.2f}x',
                     f'var_jax {ips["var_jax"]:,.2f} img/s, official {ips["official"]:,.2f} img/s '
                     f'(medians of {len(r["seconds"]["var_jax"])}, interleaved)', **r)
        else:
            part.add(f'vs official: {r["workload"]}', setting, r.get('note', 'n/a'))
    if code:
        raise RuntimeError('a compare workload failed (see its row)')


PART_FNS = {'peak': part_peak, 'train_d16': _train(16), 'train_d20': _train(20), 'sample_d16': part_sample,
            'memory_d30': part_memory, 'official': part_official}
