"""The training loop both trainers share (`training/var_task.py` for VAR, `training/tokenizer_task.py`
for the VQVAE).

A `Task` (an immutable description built by `var_task.build` / `tokenizer_task.build`) says what
is trained: models, optimizer, one update step, what is frozen and exported, evaluations. This
file does everything else, once: mesh, input, sharded state creation or exact resume, the jitted
step with shardings and donation, the non-finite guard, checkpoints (periodic, final, on SIGTERM),
metrics, progress and the dry run. `train` reads top to bottom in that order (input / state /
compile / loop / end); it never writes into the task: what it learns (the data source) goes into
the task's builder, what it found (a finished run) comes back in `Result`. What a run guarantees
(fallback from a damaged checkpoint, one run per workdir, exit status 75 after a signal, the dry
run's "what fits") is summarised in docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from var_jax.data.pipeline import make_dataset
from var_jax.io import checkpoint
from var_jax.parallel import sharding
from var_jax.utils import metrics

IMAGENET_TRAIN = 1_281_167  # schedule length for a dry run, which reads no data
# Exit status of a run stopped by SIGTERM / SIGINT after its checkpoint was saved: EX_TEMPFAIL of
# sysexits.h ("temporary failure, try again"), distinct from 0 (finished), 1 (a bug), 2 (a user
# error) and 128+N (killed by signal N before it could save), so that a scheduler can requeue on it
# (SLURM: RequeueExit=75 in slurm.conf; Kubernetes: a podFailurePolicy rule on exit code 75).
EXIT_STOPPED = 75
LOCK_FILE = '.lock'  # in the workdir: who trains in it (see `workdir_lock`)
DAMAGED = 'checkpoints-damaged'  # damaged steps are moved here, out of Orbax's reach, never deleted


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied (or skipped as non-finite)
    rng: jax.Array  # uint32 key data; the step's key is fold_in(rng, step)
    params: dict[str, Any]  # trainable models by name ('var' | 'vqvae', 'disc')
    opt_state: Any
    ema: dict[str, Any]  # EMA copies of params (empty unless the task keeps them)
    extra: dict[str, Any]  # task state (e.g. codebook usage)

    def key(self):
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def image_batch_spec(batch_size: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch of the image pipelines (var_jax/data/pipeline.py): uint8 images, labels, skip counts."""
    return {'image': jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8),
            'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            'skipped': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


def _no_evaluation(state, frozen, step, writer, final) -> dict:
    return {}


def _loss_only(m: dict) -> dict:
    return {k: m[k] for k in ('loss',) if k in m}


@dataclasses.dataclass(frozen=True)
class Task:
    """What one trainer plugs into the loop: built once from the config (and the data source) by
    `var_task.build` / `tokenizer_task.build`, read by the loop, never written."""

    name: str  # the progress prefix: '[var] step ...'
    model_configs: dict  # model.json: {'vqvae': VQVAEConfig | None, 'var': VARConfig | None, ...extra json}
    optimizer: Callable[[int, float], optax.GradientTransformation]  # (total steps, steps per epoch) -> tx
    init_params: Callable[[jax.Array], tuple[dict, dict]]  # traced: key -> (params, extra)
    train_step: Callable[..., tuple[TrainState, dict]]  # (state, batch, frozen, tx) -> (state, metrics), traced
    batch_spec: dict[str, jax.ShapeDtypeStruct]  # global shape and dtype of every batch field the step reads
    # arrays the step reads but never updates (the tokenizer of VAR training), replicated by the loop;
    # ShapeDtypeStructs for a dry run
    frozen: Any = None
    export: tuple[str, ...] = ('var',)  # params saved in the checkpoint's `params` item (what inference loads)
    ema_decay: float = 0.0  # > 0: EMA copies of the exported params, which inference then loads
    pretrained: Callable[[], dict] = dict  # {name: nnx.State} replacing fresh weights (fine-tuning), or {}
    # host side: (state, frozen, step, writer, final) -> metrics to log
    evaluate: Callable[..., dict] = _no_evaluation
    progress_fields: Callable[[dict], dict] = _loss_only  # logged metrics -> the fields of the progress line
    flops_per_image: float = 0.0  # training FLOPs, for TFLOP/s
    tokens_per_image: int = 0  # for tokens/s
    memory_knobs: tuple[str, ...] = ()  # what the dry run may suggest besides fsdp: 'remat', 'grad_accum'


Build = Callable[[Any, Any], Task]  # (config, data source or None for a dry run) -> Task


class Result(NamedTuple):
    metrics: dict  # the last logged metrics (and the final evaluation's)
    already_complete: bool  # the workdir held a finished run: nothing was trained, `metrics` are its record


# ---------------------------------------------------------------------------- helpers for tasks
def apply_updates(state: TrainState, grads, tx, params=None) -> tuple[Any, Any, jax.Array]:
    """One optimizer step -> (new params, new opt_state, pre-clip grad norm)."""
    params = state.params if params is None else params
    updates, opt_state = tx.update(grads, state.opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)


def accumulate_grads(grad_fn, batch: dict, steps: int, key):
    """Average `grad_fn(microbatch, key) -> (grads, metrics)` over `steps` microbatches (lax.scan)."""
    if steps == 1:
        return grad_fn(batch, key)
    micro = jax.tree.map(lambda x: x.reshape((steps, x.shape[0] // steps) + x.shape[1:]), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    g0, m0 = jax.eval_shape(grad_fn, first, key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, m0))

    def body(acc, i):
        g, m = grad_fn(jax.tree.map(lambda x: x[i], micro), jax.random.fold_in(key, i))
        return jax.tree.map(lambda a, b: a + b / steps, acc, (g, m)), None

    (g, m), _ = jax.lax.scan(body, zeros, jnp.arange(steps))
    return g, m


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1] (the official x * 2 - 1 of ToTensor)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class Setup:
    mesh: Any
    tx: Any
    abstract_state: Any
    state_shardings: Any
    batch_shardings: Any
    frozen: Any  # the task's frozen arrays, replicated over the mesh
    init_fn: Any  # jitted: key -> TrainState, sharded from the start
    step_fn: Any  # jitted
    total_steps: int
    steps_per_epoch: float


def _guarded(task: Task, tx):
    """The task's step, with non-finite protection: a bad loss or gradient leaves the weights and
    optimizer state untouched (the step counter still advances) and is reported in the metrics."""

    def step(state: TrainState, batch, frozen):
        new, m = task.train_step(state, batch, frozen, tx)
        ok = jnp.isfinite(m['loss']) & jnp.isfinite(m['grad_norm'])
        keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
        new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                          opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                          ema=jax.tree.map(keep, new.ema, state.ema),
                          extra=jax.tree.map(keep, new.extra, state.extra),
                          step=state.step + 1)
        if task.ema_decay > 0:
            d = task.ema_decay
            new = new.replace(ema={k: jax.tree.map(lambda e, p: jnp.where(ok, d * e + (1 - d) * p, e), v,
                                                   new.params[k]) for k, v in new.ema.items()})
        return new, {**m, 'nonfinite': (~ok).astype(jnp.int32)}

    return step


def steps_for(config, dataset_size: int) -> tuple[int, float]:
    steps_per_epoch = dataset_size / config.batch_size
    if config.get('total_steps', 0):
        return int(config.total_steps), steps_per_epoch
    if not config.get('epochs', 0):
        raise ValueError('config needs total_steps or epochs')
    return max(1, round(config.epochs * steps_per_epoch)), steps_per_epoch


def _replicated(tree, mesh):
    """The task's frozen arrays on every device (abstract ones stay abstract, with that sharding)."""
    rep = sharding.replicated(mesh)
    if tree is not None and all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
    return None if tree is None else sharding.put(tree, rep)


def setup(task: Task, config, *, dataset_size: int) -> Setup:
    # ---- mesh
    mesh = sharding.make_mesh(**config.mesh)
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp or config.batch_size % jax.process_count():
        raise ValueError(f'batch_size {config.batch_size} must be divisible by the data-parallel size {dp} '
                         f'and the process count {jax.process_count()}')
    accum = int(config.get('grad_accum', 1))
    if accum < 1 or (config.batch_size // dp) % accum:
        raise ValueError(f'grad_accum {accum} must divide the per-device batch {config.batch_size // dp}')
    total, spe = steps_for(config, dataset_size)
    tx = task.optimizer(total, spe)

    # ---- abstract state -> shardings (nothing allocated)
    def init_fn(key):
        params, extra = task.init_params(key)
        ema = {k: params[k] for k in params if k in task.export} if task.ema_decay > 0 else {}
        return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                          params=params, opt_state=tx.init(params), ema=ema, extra=extra)

    with sharding.use_mesh(mesh):
        abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
        param_sh = sharding.state_shardings(abstract_state.params, mesh)
        rep = sharding.replicated(mesh)
        state_sh = TrainState(
            step=rep, rng=rep, params=param_sh,
            opt_state=sharding.like_params(abstract_state.opt_state, abstract_state.params, param_sh, rep),
            ema={k: param_sh[k] for k in abstract_state.ema},
            extra=jax.tree.map(lambda _: rep, abstract_state.extra))
    batch_sh = {k: sharding.batch_sharding(mesh, ndim=len(v.shape)) for k, v in task.batch_spec.items()}
    frozen = _replicated(task.frozen, mesh)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = jax.jit(_guarded(task, tx), in_shardings=(state_sh, batch_sh, frozen_sh),
                      out_shardings=(state_sh, rep), donate_argnums=0)
    return Setup(mesh, tx, abstract_state, state_sh, batch_sh, frozen, jax.jit(init_fn, out_shardings=state_sh),
                 step_fn, total, spe)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_step(task: Task, s: Setup):
    """Lower + compile the step from abstract shapes; returns (compiled, memory report string)."""
    compiled, report, _ = compile_and_measure(task, s)
    return compiled, report


def compile_and_measure(task: Task, s: Setup):
    """`compile_step` -> (compiled, report line, per-device bytes or None where XLA tells none)."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_shardings[k])
             for k, v in task.batch_spec.items()}
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), s.frozen)
    with sharding.use_mesh(s.mesh):
        t0 = time.time()
        compiled = s.step_fn.lower(_abstract(s.abstract_state, s.state_shardings), batch, frozen).compile()
    report = f'compiled the train step in {time.time() - t0:.1f}s'
    mem = compiled.memory_analysis()
    total = None
    if mem is not None:
        gib = 2 ** 30
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        report += (f'; per-device memory {total / gib:.2f} GiB (arguments {mem.argument_size_in_bytes / gib:.2f}, '
                   f'outputs {mem.output_size_in_bytes / gib:.2f}, temporaries {mem.temp_size_in_bytes / gib:.2f}, '
                   f'donated/aliased {mem.alias_size_in_bytes / gib:.2f})')
    return compiled, report, total


def _split_for_checkpoint(task: Task, state: TrainState):
    params = {k: v for k, v in state.params.items() if k in task.export}
    params.update({f'{k}_ema': v for k, v in state.ema.items()})
    rest = state.replace(params={k: v for k, v in state.params.items() if k not in task.export}, ema={})
    return params, rest


def _join_from_checkpoint(task: Task, params, rest: TrainState, template: TrainState) -> TrainState:
    models = {**rest.params, **{k: params[k] for k in template.params if k in task.export}}
    ema = {k: params[f'{k}_ema'] for k in template.ema}
    return rest.replace(params=models, ema=ema)


class _Stop:
    """SIGTERM (TPU preemption) / SIGINT: finish the current step, save, exit.

    With several processes every one must stop after the same step, or the checkpoint's
    collectives wait forever for the ranks that went on. A signal therefore only marks this
    process; all processes compare marks at the next sync point (the logging steps, where they
    already wait for the device) and stop together if any was marked. TPU preemption notices
    arrive through JAX's preemption sync point, which is already agreed across processes.
    """

    def __init__(self):
        self.signal = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests)
                pass

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self, step: int, *, sync_point: bool) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        from jax.experimental import multihost_utils  # noqa: PLC0415

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        except Exception:  # noqa: BLE001, S110  (no preemption service: plain multi-process run)
            pass
        if not sync_point:
            return False
        marks = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(marks))

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- one run per workdir
_HELD: dict[str, list] = {}  # lock path -> [open file or None, depth]: re-entrant within a process


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f'pid {h["pid"]} on host {h["host"]}, started {h["started"]}'
    except (ValueError, KeyError, TypeError):
        return 'holder unknown'


@contextlib.contextmanager
def workdir_lock(workdir):
    """Hold `workdir/.lock` while training: a second run on the same workdir stops with one line
    (two runs would interleave checkpoints and duplicate metrics).

    The lock is `fcntl.flock`, which the kernel releases when the holding process ends in any way,
    `kill -9` and a crash included, so a dead run never leaves a stale lock; the file's content
    (pid, host, start time) only names the holder in the error, and the file itself stays. Process
    0 locks for a multi-process run and tells the others, so every rank stops the same way.
    Re-entrant within a process (`var_task.run` holds it over the tokenizer and VAR phases). Local
    file systems only: a gs:// workdir is not locked (docs/reliability.md).
    """
    import fcntl  # noqa: PLC0415  (POSIX only)

    workdir = checkpoint.abspath(workdir)
    if '://' in str(workdir):
        yield
        return
    path = os.path.join(os.fspath(workdir), LOCK_FILE)
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    fh, holder = None, ''
    if jax.process_index() == 0:
        os.makedirs(os.fspath(workdir), exist_ok=True)
        fh = open(path, 'a+')  # noqa: SIM115  (held open for the run; 'a+' keeps the holder's note readable)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or '{}'
            fh.close()
            fh = None
        else:
            fh.seek(0)
            fh.truncate()
            started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
            fh.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': started}))
            fh.flush()
    refused = bool(holder)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused:
        who = _describe_holder(holder) if holder else 'on process 0'
        raise ValueError(f'{workdir} is in use by another run ({who}); '
                         'wait for it to finish or stop it (a stopped or killed run frees the workdir)')
    _HELD[path] = [fh, 1]
    try:
        yield
    finally:
        del _HELD[path]
        if fh is not None:
            fh.close()  # closing the file releases the lock


# ---------------------------------------------------------------------------- dry run: what fits
def device_memory(given_gib: float = 0.0) -> tuple[int | None, str]:
    """-> (bytes one device can hold, where that number comes from). `given_gib` pretends a target
    device (a CPU dry run knows no device memory)."""
    if given_gib:
        return int(given_gib * 2 ** 30), f'{given_gib:g} GiB (given)'
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory stats)
        stats = {}
    limit = stats.get('bytes_limit')
    if not limit:
        return None, 'unknown'
    return int(limit), f'{limit / 2 ** 30:.1f} GiB ({jax.local_devices()[0].device_kind})'


def _variant(config, **dotted):
    """A copy of `config` with these `a.b.c=value` settings."""
    c = copy.deepcopy(config)
    c.update_from_flattened_dict(dotted)
    return c


def what_fits(config, build: Build, need: int, limit: int, *, memory_knobs: tuple[str, ...], mesh_shape: dict,
              dataset_size: int, max_compiles: int = 5) -> dict | None:
    """Settings that keep the recipe's global batch and bring the compiled per-device memory under
    `limit`, tried cheapest first and each compiled (abstract shapes, no data): all data-parallel
    devices into fsdp (parameters and optimizer state sharded over every device), then `remat=block`
    (recompute each block in the backward pass, ~1/3 more compute), then gradient accumulation
    (`grad_accum` micro-batches; activations shrink ~k-fold, the step takes as long). For
    accumulation, memory ~ fixed + activations / k is fitted from k = 1 and 2 and the predicted k
    compiled, so a search costs at most `max_compiles` compiles.
    Each setting is a new task built from the changed config (`build`).
    -> {'args': [--config overrides], 'bytes_per_device': int} for the first that fits, or None."""
    tried, applied, best = 0, {}, None
    data, fsdp, tensor = (int(mesh_shape[a]) for a in sharding.MESH_AXES)
    n = data * fsdp * tensor
    steps: list[dict] = []
    if data > 1:
        steps.append({'mesh.data': 1, 'mesh.fsdp': data * fsdp})
    if 'remat' in memory_knobs and config.model.get('remat', 'none') == 'none':
        steps.append({'model.remat': 'block'})

    def measure(overrides):
        nonlocal tried, best
        tried += 1
        c = _variant(config, **overrides)
        try:
            t = build(c, None)
            got = compile_and_measure(t, setup(t, c, dataset_size=dataset_size))[2]
        except ValueError:  # a setting this mesh or batch does not allow
            return None
        if got is not None and (best is None or got < best[1]):
            best = (dict(overrides), got)
        return got

    last = need
    for step in steps:
        if tried >= max_compiles:
            break
        got = measure({**applied, **step})
        if got is None:
            continue
        applied.update(step)
        last = got
        if got <= limit:
            return _suggestion(applied, got)
    if 'grad_accum' in memory_knobs and tried < max_compiles:
        per_device = config.batch_size // max(1, n // tensor)  # over data x fsdp, whatever their split
        accum0 = int(config.get('grad_accum', 1))
        ks = [k for k in (2, 4, 8, 16, 32, 64, 128, 256) if k > accum0 and per_device % k == 0]
        m2 = measure({**applied, 'grad_accum': ks[0]}) if ks else None
        if m2 is not None and m2 <= limit:
            return _suggestion({**applied, 'grad_accum': ks[0]}, m2)
        if m2 is not None and m2 < last:
            # memory(k) = fixed + activations / k, through (accum0, last) and (ks[0], m2)
            act = (last - m2) / (1 / accum0 - 1 / ks[0])
            fixed = m2 - act / ks[0]
            for k in ks[1:]:
                if tried >= max_compiles:
                    break
                if fixed + act / k > limit and k != ks[-1]:
                    continue  # predicted not to fit: skip the compile (the largest k is tried anyway)
                got = measure({**applied, 'grad_accum': k})
                if got is not None and got <= limit:
                    return _suggestion({**applied, 'grad_accum': k}, got)
    return None if best is None else {**_suggestion(*best), 'fits': False}


def _suggestion(overrides: dict, got: int) -> dict:
    return {'args': [f'--config.{k}={v}' for k, v in overrides.items()], 'bytes_per_device': int(got), 'fits': True}


def dry_run_report(config, build: Build, *, device_memory_gib: float = 0.0) -> dict:
    """Compile the step of `build(config, None)` from abstract shapes (no data, no weights, nothing
    written), print the per-device memory, compare it with the device's and, when it does not fit,
    say which settings make it fit. `device_memory_gib` pretends the target device's memory."""
    task = build(config, None)
    size = int(config.data.get('size_hint', IMAGENET_TRAIN))
    s = setup(task, config, dataset_size=size)
    _, report, need = compile_and_measure(task, s)
    me = jax.process_index() == 0
    say = (lambda m: print(f'[{task.name}] {m}', flush=True)) if me else (lambda m: None)  # noqa: E731
    say(f'dry run on {s.mesh.devices.size} devices (mesh {dict(s.mesh.shape)}): {report}')
    out = {'dry_run': report, 'bytes_per_device': need, 'fits': None, 'suggestion': None}
    limit, where = device_memory(device_memory_gib)
    gib = 2 ** 30
    if need is None:
        return out
    if limit is None:
        say('device memory unknown here: add --dry_run_memory_gib=G to check a target device (JAX on an '
            '80 GB H100 gets ~60 GiB by default, 75 % of it; TPU v5p 95, v6e 32)')
        return out
    out['fits'] = need <= limit
    if out['fits']:
        say(f'fits: {need / gib:.2f} GiB per device of {where}')
        return out
    say(f'does not fit: {need / gib:.2f} GiB per device > {where}; trying settings that keep the global batch '
        f'{config.batch_size}')
    sug = what_fits(config, build, need, limit, memory_knobs=task.memory_knobs, mesh_shape=dict(s.mesh.shape),
                    dataset_size=size)
    out['suggestion'] = sug
    if sug is None:
        say('nothing tried changes the memory: more devices (a larger fsdp) or a smaller batch')
    elif sug['fits']:
        say(f'fits with: {" ".join(sug["args"])} -> {sug["bytes_per_device"] / gib:.2f} GiB per device')
    else:
        say(f'still too large with {" ".join(sug["args"])} ({sug["bytes_per_device"] / gib:.2f} GiB per device): '
            'more devices (a larger fsdp) or a smaller batch')
    return out


def train(config, workdir, build: Build, *, kill_after_step: int | None = None) -> Result:
    """Train the task `build(config, data source)` into `workdir` (an absolute path, see
    `checkpoint.abspath`), resuming if it holds checkpoints; one run per workdir (`workdir_lock`).

    `kill_after_step`: fault injection for tests: the process SIGKILLs itself right after that step,
    once pending checkpoint writes are on disk (the `kill -9` of the resume test without a timing
    race)."""
    with workdir_lock(workdir):
        return _train(config, workdir, build, kill_after_step)


def _train(config, workdir, build: Build, kill_after_step: int | None) -> Result:
    # ---- input (this process's share of the global batch), then the task, which may depend on it
    local_batch = config.batch_size // jax.process_count()
    data_iter, source = make_dataset(config.data, split='train', local_batch=local_batch, seed=config.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    task = build(config, source)
    s = setup(task, config, dataset_size=len(source))

    # ---- state: resume or create (sharded from the start)
    cfgs = task.model_configs
    if jax.process_index() == 0:
        checkpoint.write_model_json(workdir, vqvae=cfgs.get('vqvae'), var=cfgs.get('var'),
                                    **{k: v for k, v in cfgs.items() if k not in ('vqvae', 'var')})
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=1))
    ckpt = checkpoint.TrainCheckpointer(workdir, keep=config.get('keep_checkpoints', 3))
    data_iter = iter(data_iter)
    with sharding.use_mesh(s.mesh):
        if ckpt.latest_step() is not None:
            p_abs, r_abs = _split_for_checkpoint(task, _abstract(s.abstract_state, s.state_shardings))
            at, params, rest, damaged = ckpt.restore_intact(p_abs, r_abs, data_iter)
            for bad, reason in damaged:  # newer than `at`, which restored into the same targets
                kept = workdir / DAMAGED / f'step-{bad}-{time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}'
                ckpt.set_aside(bad, kept)
                if jax.process_index() == 0:
                    print(f'warning: checkpoint step {bad} is damaged ({reason}); resuming from step {at} '
                          f'(the damaged step is kept in {kept})', file=sys.stderr, flush=True)
            state = _join_from_checkpoint(task, params, rest, s.abstract_state)
            print(f'[{task.name}] resumed from {workdir} at step {int(state.step)}', flush=True)
            _say_what_changed(task, ckpt.run_metadata(at), _run_meta(config, s), at)
        else:
            state = s.init_fn(jax.random.key(config.seed))
            pre = task.pretrained()
            if pre:  # fine-tuning: given weights, fresh optimizer state
                placed = {k: sharding.put(v, s.state_shardings.params[k]) for k, v in pre.items()}
                state = state.replace(params={**state.params, **placed},
                                      ema={k: placed.get(k, v) for k, v in state.ema.items()})
                print(f'[{task.name}] initialised {", ".join(pre)} from {config.init_from}', flush=True)
    start = int(state.step)
    done = _final_record(workdir, s.total_steps) if start >= s.total_steps else None
    if done is not None:  # re-running a finished run: its final evaluation is on record, nothing to do
        ckpt.close()
        if hasattr(data_iter, 'close'):
            data_iter.close()
        if jax.process_index() == 0:
            print(f'[{task.name}] already complete at step {start}; nothing to train', flush=True)
        return Result(done, already_complete=True)

    # ---- compile
    compiled, report = compile_step(task, s)
    if jax.process_index() == 0:
        print(f'[{task.name}] {report}', flush=True)

    # ---- loop
    writer = metrics.Writer(workdir)
    progress = metrics.Progress(task.name, s.total_steps, start)
    stop = _Stop()
    log_every, ckpt_every = config.get('log_every', 50), config.get('checkpoint_every', 1000)
    eval_every = config.get('eval_every', 0)
    pending, skipped, nonfinite_run, last = [], 0, 0, {}
    t_last, n_last = time.time(), start
    step = start
    try:
        while step < s.total_steps:
            local = next(data_iter)
            batch = {k: jax.make_array_from_process_local_data(s.batch_shardings[k], np.asarray(local[k]))
                     for k in s.batch_shardings}
            with sharding.use_mesh(s.mesh):
                state, m = compiled(state, batch, s.frozen)
            step += 1
            pending.append(m)
            if step % log_every == 0 or step == s.total_steps or step == start + 1:
                fetched = jax.device_get(pending)
                pending = []
                last, nf, new_skips = metrics.reduce_steps(fetched)
                skipped += new_skips
                nonfinite_run = nonfinite_run + nf if nf == len(fetched) else nf
                now = time.time()
                dt = (now - t_last) / max(step - n_last, 1)
                t_last, n_last = now, step
                ips = config.batch_size / dt
                last.update(data_skipped_total=skipped, images_per_sec=ips, sec_per_step=dt,
                            epoch=step / s.steps_per_epoch)
                if task.flops_per_image:
                    last['tflops_per_sec'] = task.flops_per_image * ips / 1e12
                if task.tokens_per_image:
                    last['tokens_per_sec'] = ips * task.tokens_per_image
                writer.scalars(step, last)
                progress.update(step, task.progress_fields(last))
                if new_skips and jax.process_index() == 0:  # not only in metrics.jsonl
                    print(f'[{task.name}] data: {new_skips} unreadable image(s) skipped in the last {len(fetched)} '
                          f'steps, {skipped} so far (each replaced by the next readable one)', flush=True)
                if nf:
                    print(f'[{task.name}] WARNING: non-finite loss or gradient in {nf} of the last {len(fetched)} '
                          f'steps (up to step {step}); those updates were skipped', flush=True)
                if nonfinite_run >= config.get('max_nonfinite', 20):
                    raise FloatingPointError(f'{nonfinite_run} consecutive non-finite steps at step {step}; '
                                             'stopping (weights are from the last finite step)')
            if eval_every and step % eval_every == 0 and step < s.total_steps:
                last.update(task.evaluate(state, s.frozen, step, writer, final=False))
            if step % ckpt_every == 0 or step == s.total_steps:
                p, r = _split_for_checkpoint(task, state)
                ckpt.save(step, p, r, data_iter, force=True, meta=_run_meta(config, s))
            if step == kill_after_step:  # fault injection for tests: a hard kill right after this step
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop.requested(step, sync_point=step % log_every == 0):
                p, r = _split_for_checkpoint(task, state)
                ckpt.save(step, p, r, data_iter, force=True, meta=_run_meta(config, s))
                ckpt.wait()
                print(f'[{task.name}] stopped by signal at step {step}; checkpoint saved in {workdir}. '
                      f'Run the same command to resume (exit status {EXIT_STOPPED}).', flush=True)
                raise SystemExit(EXIT_STOPPED)

        # ---- end: the final evaluation, logged as final/* (what a rerun of a finished run returns)
        if step == s.total_steps:
            last.update(task.evaluate(state, s.frozen, step, writer, final=True))
            writer.scalars(step, {f'final/{k}': v for k, v in last.items()})
    finally:
        stop.restore()
        ckpt.close()
        writer.close()
        if hasattr(data_iter, 'close'):
            data_iter.close()
    return Result(last, already_complete=False)


def _run_meta(config, s: Setup) -> dict:
    """Stored with every checkpoint, to tell a resumed run what it changes."""
    return {'batch_size': int(config.batch_size), 'total_steps': int(s.total_steps),
            'grad_accum': int(config.get('grad_accum', 1))}


def _say_what_changed(task: Task, old: dict, new: dict, step: int) -> None:
    """One line when a run resumes with another global batch or schedule length (allowed: e.g.
    more devices, or training longer; the step count, learning-rate schedule and data position
    continue from `step` as counted in the new steps)."""
    changed = [f'{k} {new[k]} (the checkpoint\'s run: {old[k]})' for k in ('batch_size', 'total_steps')
               if k in old and old[k] != new[k]]
    if changed and jax.process_index() == 0:
        print(f'[{task.name}] note: resuming step {step} with {", ".join(changed)}; the learning-rate schedule '
              f'and the data position continue from step {step} in the new steps', flush=True)


def _final_record(workdir, total_steps: int) -> dict | None:
    """The `final/*` metrics logged at `total_steps` (without the prefix), or None when the run
    stopped before its final evaluation was logged (then the evaluation runs again)."""
    for rec in reversed(metrics.read_jsonl(workdir)):
        if rec.get('step') == total_steps and any(k.startswith('final/') for k in rec):
            return {k[len('final/'):]: v for k, v in rec.items() if k.startswith('final/')}
    return None
