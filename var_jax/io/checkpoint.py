"""Orbax checkpoints: model checkpoints (convert / sample) and training state (both trainers).

A *model checkpoint* directory holds `model.json` (the model configs) and `params/` (an Orbax
checkpoint of {'vqvae': ..., 'var': ...} parameter states). A *training workdir* holds the same
`model.json` plus `checkpoints/<step>/` written by `TrainCheckpointer`; `load_model` reads either,
so `python -m var_jax.sample --checkpoint` takes a converted checkpoint or a training workdir
(`open_checkpoint`: the one way to open either for sampling, reading model.json only).
Writes go to a temporary sibling and are renamed into place: an interrupted save leaves nothing
half-written under the final name. A step that is there but does not read back (a cut or damaged
file) is *damaged*: training falls back to the newest intact step (`TrainCheckpointer.restore_intact`,
the step is moved aside, never deleted), and reading parameters for inference names the damaged
and the intact steps in one error line (`restore_params`); docs/reliability.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from var_jax.io import outputs
from var_jax.models import VARConfig, VQVAEConfig, abstract, check_pair
from var_jax.models.config import to_jnp_dtype

MODEL_FILE = 'model.json'
TOKENIZER_DIR = 'tokenizer'  # a VAR workdir's copy of its tokenizer (a model checkpoint)
FORMAT = 'var_jax.model/1'


# ---------------------------------------------------------------------------- model configs
def write_model_json(directory, *, vqvae: VQVAEConfig | None, var: VARConfig | None, **extra) -> None:
    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    payload = {'format': FORMAT, 'vqvae': vqvae.to_dict() if vqvae else None,
               'var': var.to_dict() if var else None, **extra}
    tmp = d / f'.{MODEL_FILE}.{uuid.uuid4().hex}'
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(d / MODEL_FILE)  # replace, not rename: a resumed run rewrites it


def read_model_json(directory) -> tuple[VQVAEConfig | None, VARConfig | None, dict]:
    f = epath.Path(directory) / MODEL_FILE
    if not f.exists():
        raise ValueError(f'{directory}: not a var_jax checkpoint or workdir (no {MODEL_FILE})')
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{f}: corrupt ({e})') from None
    if d.get('format') != FORMAT:
        raise ValueError(f'{f}: unknown format {d.get("format")!r} (expected {FORMAT})')
    vq = VQVAEConfig.from_dict(d['vqvae']) if d.get('vqvae') else None
    var = VARConfig.from_dict(d['var']) if d.get('var') else None
    return vq, var, d


# ---------------------------------------------------------------------------- abstract targets
def abstract_params(cfg, shardings=None):
    """Abstract parameter state of a model (ShapeDtypeStructs with a sharding, as Orbax needs)."""
    state = nnx.state(abstract(cfg), nnx.Param)
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def merge_params(cfg, params):
    graphdef, _ = nnx.split(abstract(cfg))
    return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------- model checkpoints
def _sync_directories() -> ocp.AsyncOptions:
    """Every checkpointer here creates a save's directories before the save's barrier.

    Orbax's default (asynchronous creation) has the other processes wait for the primary host's
    directories through coordination-service keys named after a per-process count of saves, which
    assumes that all processes make the same saves. Process 0 alone saves model checkpoints during a
    multi-process run (the tokenizer copy of a VAR workdir), so the counts then differ: the other
    processes looked up keys never set, did not wait, and wrote the grain `data` item into a
    directory not created yet (FileNotFoundError on rank 1 while rank 0 waited in the save's next
    barrier: the run hung until the coordination timeout). Synchronous creation uses no such keys.
    """
    return ocp.AsyncOptions(create_directories_asynchronously=False)


def abspath(path) -> epath.Path:
    """An absolute path (Orbax refuses relative ones); URLs such as gs://... pass unchanged."""
    return epath.Path(path) if '://' in str(path) else epath.Path(os.path.abspath(os.fspath(path)))


def _only_me() -> ocp.options.MultiprocessingOptions:
    # Model checkpoints are small, host-local files: each process reads its own copy and process 0
    # alone writes one, so no barrier may wait for the other processes of a multi-host run.
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _this_process_only() -> ocp.StandardCheckpointer:
    return ocp.StandardCheckpointer(async_options=_sync_directories(), multiprocessing_options=_only_me())


MODEL_ENTRIES = frozenset({MODEL_FILE, 'params'})  # all that save_model writes: what --force may replace


def check_model_output(out, *, overwrite: bool):
    """May `save_model(out, overwrite=...)` write there? Checked by the tools before any work;
    `--force` replaces only a previous model checkpoint (var_jax.io.outputs)."""
    return outputs.check_dir_output(out, force=overwrite, own=MODEL_ENTRIES, what='a model checkpoint')


def save_model(out, *, vqvae, var=None, overwrite: bool = False, source: dict | None = None) -> None:
    """Write a model checkpoint directory atomically (temporary sibling, then rename); an existing
    one is replaced (with `overwrite`) only after the new one is complete."""
    out = abspath(check_model_output(out, overwrite=overwrite))
    if var is not None:
        check_pair(vqvae.config, var.config)
    tmp = outputs.temp_sibling(out)
    try:
        params = {'vqvae': nnx.state(vqvae, nnx.Param)}
        if var is not None:
            params['var'] = nnx.state(var, nnx.Param)
        params = jax.tree.map(np.asarray, params)  # host values: Orbax refuses host-local arrays multi-host
        with _this_process_only() as ckptr:
            ckptr.save(tmp / 'params', params)
            ckptr.wait_until_finished()
        write_model_json(tmp, vqvae=vqvae.config, var=var.config if var else None, source=source or {})
        outputs.replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(os.fspath(tmp), ignore_errors=True)


def check_finite(params, where) -> None:
    """Refuse NaN / Inf parameters (a diverged run, a damaged file): sampled, they give a garbage
    grid with exit code 0. Checked on the host, shard by shard (this process's shards): a jitted
    check would have to agree with whatever mesh the caller has set as context, and loading runs
    both inside and outside one."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]

    def finite(x) -> bool:
        shards = x.addressable_shards if isinstance(x, jax.Array) else ()
        parts = [s.data for s in shards] if shards else [x]
        return all(np.isfinite(np.asarray(d)).all() for d in parts)

    bad = [_dotted(p) for p, x in flat if not finite(x)]
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise ValueError(f'{where}: non-finite (NaN or Inf) parameters in {shown}')


def _dotted(path) -> str:
    names = []
    for k in path:
        name = getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))
        if name != 'value':
            names.append(str(name))
    return '.'.join(names)


def load_model(path, *, step: int | None = None, need_var: bool = False, tokenizer_only: bool = False,
               shardings=None, dtype: str | None = None):
    """Model checkpoint or training workdir -> (VQVAE, VAR or None), NNX modules with float32
    parameters. Non-finite parameters are refused.

    `tokenizer_only`: read the VQVAE alone (VAR -> None) without restoring the VAR weights, which
    for a large VAR are most of the bytes. `dtype`: the models' compute dtype ('float32',
    'bfloat16'; default: as saved in model.json); the parameters stay float32 either way."""
    path = abspath(path)
    if not path.exists():
        raise ValueError(f'{path}: no such checkpoint directory')
    vq_cfg, var_cfg, meta = read_model_json(path)
    if vq_cfg is None:
        raise ValueError(f'{path}: holds no tokenizer config')
    if need_var and var_cfg is None:
        raise ValueError(f'{path}: holds a tokenizer only; a VAR checkpoint is needed here')
    want_var = var_cfg is not None and not tokenizer_only
    sh = shardings or {}
    target = {'vqvae': abstract_params(vq_cfg, sh.get('vqvae'))}
    if want_var:
        target['var'] = abstract_params(var_cfg, sh.get('var'))
    if (path / 'params').exists():
        params = _restore(path / 'params', target, partial=var_cfg is not None and not want_var)
    elif (path / CHECKPOINTS).exists():
        if var_cfg is not None and not want_var:
            params = {}  # a VAR workdir's checkpoints hold VAR weights only; its tokenizer is beside them
        else:
            ckpt = TrainCheckpointer(path, read_only=True)
            params = ckpt.restore_params(target, step=step)
            ckpt.close()
    else:
        raise ValueError(f'{path}: has {MODEL_FILE} but no params/ or {CHECKPOINTS}/ (incomplete?)')
    if 'vqvae' not in params:  # a VAR training workdir: the frozen tokenizer is stored beside it
        tok = meta.get('tokenizer')
        if not tok:
            raise ValueError(f'{path}: holds no tokenizer parameters and names no tokenizer')
        tok_path = epath.Path(tok) if epath.Path(tok).is_absolute() else path / tok
        params['vqvae'] = nnx.state(load_model(tok_path, shardings={'vqvae': sh.get('vqvae')})[0], nnx.Param)
    check_finite(params, path)
    if dtype is not None:
        to_jnp_dtype(dtype)  # a clear error for an unknown name
        vq_cfg = vq_cfg.replace(dtype=dtype)
        var_cfg = var_cfg.replace(dtype=dtype) if var_cfg is not None else None
    vqvae = merge_params(vq_cfg, params['vqvae'])
    var = merge_params(var_cfg, params['var']) if want_var else None
    return vqvae, var


@dataclasses.dataclass
class Checkpoint:
    """A VAR checkpoint opened for sampling: its configs are read, its parameters not yet."""
    path: epath.Path
    vq_cfg: VQVAEConfig
    var_cfg: VARConfig
    meta: dict
    step: int | None  # training workdirs: the step loaded

    @property
    def num_classes(self) -> int:
        return self.var_cfg.num_classes

    @property
    def image_size(self) -> int:
        return self.vq_cfg.image_size

    def fingerprint(self) -> str:
        return hashlib.sha256((self.path / MODEL_FILE).read_bytes()).hexdigest()[:16]

    def load(self, dtype: str | None = None):
        """-> (vqvae, var); the parameters are read only now, after every cheap check passed.
        `dtype`: compute dtype of both models (None: as saved)."""
        return load_model(self.path, step=self.step, need_var=True, dtype=dtype)


def open_checkpoint(path, step: int | None = None) -> Checkpoint:
    """A converted checkpoint or a training workdir (its latest step unless `step`), for sampling.
    Reads model.json only (fast); errors name the directory and what is wrong with it."""
    d = epath.Path(path)
    if not d.exists():
        raise ValueError(f'{path}: no such checkpoint directory')
    vq_cfg, var_cfg, meta = read_model_json(d)
    if var_cfg is None:
        raise ValueError(f'{path}: holds a tokenizer only; sampling needs a VAR checkpoint')
    if vq_cfg is None:
        raise ValueError(f'{path}: holds no tokenizer config')
    if (d / 'params').exists():
        if step is not None:
            raise ValueError(f'{path}: --step applies to training workdirs, this is a converted checkpoint')
    else:
        ckpts = d / CHECKPOINTS
        steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []
        if not steps:
            raise ValueError(f'{path}: no parameters (no params/ and no saved step in {CHECKPOINTS}/)')
        if step is not None and step not in steps:
            raise ValueError(f'{path}: no step {step}; saved steps: {", ".join(map(str, steps))}')
        step = steps[-1] if step is None else step
    return Checkpoint(d, vq_cfg, var_cfg, meta, step)


def _restore(directory, target, *, partial: bool = False):
    """`partial`: the directory may hold more models than `target`; only those in it are read."""
    try:
        if partial:
            handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=_only_me())
            with ocp.Checkpointer(handler, multiprocessing_options=_only_me()) as ckptr:
                return ckptr.restore(directory, args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        with _this_process_only() as ckptr:
            return ckptr.restore(directory, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ValueError(f'{directory}: cannot restore parameters ({str(e).splitlines()[0][:300]})') from None


# ---------------------------------------------------------------------------- training state
CHECKPOINTS = 'checkpoints'


class _NoReadOnlyNotice(logging.Filter):
    """Orbax warns 'Given directory is read only' whenever a manager is opened read-only, which is
    what reading a workdir for sampling or evaluation means: noise on the console of those tools."""

    def filter(self, record):
        return not str(record.msg).startswith('Given directory is read only')


logging.getLogger('absl').addFilter(_NoReadOnlyNotice())


def damage_reason(e: BaseException) -> str:
    """One short line from what Orbax / TensorStore raise for a step that does not read back (a
    bare Exception with the TensorStore spec for a cut array chunk, JSONDecodeError for a damaged
    metadata file, FileNotFoundError, ...)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = text.split('. See full TensorStore details')[0]
    return f'{type(e).__name__}: {text[:200]}' if type(e) is not ValueError else text[:200]


def _drop_read_echoes(hook):
    """A damaged array chunk fails one of the many reads Orbax runs at once; the other reads'
    coroutines then fail too when they are collected, and Python prints each of those as
    "Exception ignored in: <coroutine ...>" with the whole TensorStore spec (~160 lines for one cut
    file). The first failure is reported as one line (`damage_reason`); these echoes are dropped."""

    def quiet(u):
        if not str(u.exc_value).startswith('Encountered error while reading array index'):
            hook(u)

    return quiet


sys.unraisablehook = _drop_read_echoes(sys.unraisablehook)


def all_finite(tree) -> bool:
    """No NaN / inf in the restored floats (one reduction on the devices where they already lie)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


class TrainCheckpointer:
    """Orbax CheckpointManager over `workdir/checkpoints/<step>/` with three items:

    `params` (what inference loads: {'var': ...} or {'vqvae': ...}, plus '<name>_ema'), `state`
    (everything else needed to continue: step, rng, optimizer, other models, task extras) and
    `data` (the grain iterator position). Saves are asynchronous; `wait()` before exiting.
    """

    def __init__(self, workdir, *, keep: int | None = 3, async_save: bool = True, read_only: bool = False):
        self.workdir = abspath(workdir)
        if read_only:  # what Orbax would otherwise warn that it overrides
            keep = None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               save_interval_steps=0 if read_only else 1,
                                               enable_async_checkpointing=async_save,
                                               async_options=_sync_directories(),
                                               # a save cut short (kill, preemption) leaves Orbax's tmp dir
                                               cleanup_tmp_directories=not read_only)
        import grain  # noqa: PLC0415

        # handlers registered up front, so metadata (which models a step holds) is readable
        self.mngr = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS, options=options,
            item_handlers={'params': ocp.StandardCheckpointHandler(), 'state': ocp.StandardCheckpointHandler(),
                           'data': grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, params, state, data_iter=None, *, force: bool = False, meta: dict | None = None) -> bool:
        """`meta`: small JSON facts about the run stored with the step (`run_metadata`)."""
        import grain  # noqa: PLC0415

        items = {'params': ocp.args.StandardSave(params), 'state': ocp.args.StandardSave(state)}
        if data_iter is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mngr.save(step, args=ocp.args.Composite(**items), force=force, custom_metadata=meta or {})

    def restore(self, params_target, state_target, data_iter=None, step: int | None = None):
        step = self.latest_step() if step is None else step
        try:
            return self._read(step, params_target, state_target, data_iter)
        except Exception as e:  # noqa: BLE001  (see `damage_reason`)
            raise ValueError(f'{self.workdir}: cannot restore step {step} ({damage_reason(e)}); '
                             'was it written by another config?') from None

    def _read(self, step, params_target, state_target, data_iter=None):
        import grain  # noqa: PLC0415

        items = {'params': ocp.args.StandardRestore(params_target), 'state': ocp.args.StandardRestore(state_target)}
        if data_iter is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        if not all_finite((out['params'], out['state'])):
            raise ValueError('non-finite values')  # the trainer never saves them: a flipped exponent bit
        return out['params'], out['state']

    def restore_intact(self, params_target, state_target, data_iter=None):
        """Restore the newest step that reads back whole -> (step, params, state, damaged), where
        `damaged` lists the newer steps that did not, as (step, reason).

        A step is taken for damaged only when an older one restores into the same targets: when
        none does, the config rather than the files is the likely cause, and the newest step's
        error is raised with nothing marked. Every process reads the same files (shared storage), so
        all of them fall back to the same step."""
        steps = sorted(self.mngr.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                params, state = self._read(step, params_target, state_target, data_iter)
            except Exception as e:  # noqa: BLE001
                damaged.append((step, damage_reason(e)))
                continue
            return step, params, state, damaged
        step, reason = damaged[0]
        raise ValueError(f'{self.workdir}: cannot restore step {step} ({reason}); was it written by another config?')

    def set_aside(self, step: int, dest) -> None:
        """Move a damaged step out of `checkpoints/` (to `dest`): Orbax then neither lists it as the
        newest step, nor refuses the next save of the same step number, nor deletes it when it
        rotates old checkpoints out; the bytes stay for inspection. Process 0 moves, all wait."""
        if jax.process_index() == 0:
            dest = epath.Path(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.workdir / CHECKPOINTS / str(step)).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f'var_jax set aside step {step}')
        self.mngr.reload()

    def run_metadata(self, step: int) -> dict:
        """What `save(meta=...)` stored with `step` ({} for checkpoints written before it existed)."""
        try:
            return dict(self.mngr.metadata(step).custom_metadata or {})
        except Exception:  # noqa: BLE001
            return {}

    def restore_params(self, target: dict[str, Any], step: int | None = None):
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f'{self.workdir}: no checkpoint saved yet')
        try:
            return self._read_params(target, step)
        except ValueError as e:
            if 'model.json does not describe' in str(e):
                raise
            reason = str(e)
        except Exception as e:  # noqa: BLE001
            reason = damage_reason(e)
        intact = []
        for other in sorted(self.mngr.all_steps(), reverse=True):
            if other != step:
                try:
                    self._read_params(target, other)
                    intact.append(other)
                except Exception:  # noqa: BLE001, S112
                    continue
        if intact:  # the same model reads from other steps: these files are damaged
            raise ValueError(f'{self.workdir}: checkpoint step {step} is damaged ({reason}); intact steps: '
                             f'{", ".join(map(str, intact))} (sample --step N reads one; training falls back to the '
                             f'newest by itself)')
        raise ValueError(f'{self.workdir}: cannot restore parameters of step {step} ({reason})')

    def _read_params(self, target, step):
        meta = self.mngr.item_metadata(step)['params']
        names = set(meta.keys()) if meta is not None else set(target)
        unknown = sorted(n for n in names if n.removesuffix('_ema') not in target)
        if unknown:
            raise ValueError(f'{self.workdir}: step {step} holds parameters {unknown} that model.json does not '
                             'describe')
        want = {n: target[n.removesuffix('_ema')] for n in names}  # an EMA copy has its model's shapes
        out = self.mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(want)))['params']
        if not all_finite(out):
            raise ValueError('non-finite values')
        # prefer EMA weights when the run kept them
        return {k: out.get(f'{k}_ema', out[k]) for k in target if k in out}

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()
