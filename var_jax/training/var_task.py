"""The VAR task for the shared loop (`training/loop.py`): `build` describes it, `run` is the whole
of `python -m var_jax.train` (the tokenizer phase, VAR, the score, a summary).

One update, `train_step` (official `VARTrainer.train_step`):
    images --frozen VQVAE encoder + quantizer, float32, no gradient--> per-scale tokens r_1..r_K
        (`encode_batch`; with data.source='tokens', var_jax/pretokenize.py, the tokens come with
        the batch and only the codebook lookups, bicubic up / area down and the Phi convs run:
        official `idxBl_to_var_input`)
    -> teacher-forcing input x_BLCv_wo_first_l -> VAR (label dropout, drop-path), compute dtype
    -> loss = mean over the L tokens of the cross-entropy (optionally label-smoothed)
    -> AdamW with the official lr / wd schedules (`make_optimizer`).
Logged as the official trainer does: Lm / Lt (all tokens / last scale), Accm / Acct, per-scale
accuracy and loss, vocabulary usage, the pre-clip grad norm and lr; the loop adds images/s,
tokens/s and TFLOP/s (`metrics.var_flops_per_image`). Evaluation: a grid of samples per class.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from var_jax.data import tokens
from var_jax.data.pipeline import make_source
from var_jax.eval import folder_score
from var_jax.io import checkpoint
from var_jax.models import PATCH_NUMS, VAR, VARConfig, VQVAEConfig, abstract, vqvae_config
from var_jax.models.var import scale_bounds
from var_jax.parallel import distributed
from var_jax.sampling import batch
from var_jax.sampling.settings import check_settings
from var_jax.training import configs, finetune, loop, optim, own_data, tokenizer_task
from var_jax.utils import metrics, viz

TOKENIZER_DIR = checkpoint.TOKENIZER_DIR


# ---------------------------------------------------------------------------- the frozen tokenizer
@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """The VQVAE that VAR trains on: its config, its float32 weights (None: abstract, a dry run) and
    the path model.json records for it (relative to the workdir; None when given by the caller)."""

    config: VQVAEConfig
    params: Any = None
    ref: str | None = None


def given_tokenizer(vq) -> Tokenizer:
    """A VQVAE module to use as is (benchmarks, tests): nothing is read or written."""
    return Tokenizer(vq.config, nnx.state(vq, nnx.Param))


def resolve_tokenizer(config, workdir, *, dry_run: bool = False) -> Tokenizer:
    """config.tokenizer -> the tokenizer, with its copy saved in `workdir/tokenizer` (what sampling
    decodes with). A dry run needs no weights: the tokenizer this run would train, or the
    official-size one when none is named."""
    tcfg = config.tokenizer
    path = tcfg.checkpoint
    local = epath.Path(workdir) / TOKENIZER_DIR
    if not path:
        if (local / checkpoint.MODEL_FILE).exists():
            path = str(local)
        elif dry_run and tcfg.get('train'):  # the tokenizer this run would train first
            return Tokenizer(configs.vqvae_model_config(tcfg.train.model))
        elif dry_run:  # compile against the official-size tokenizer; no weights needed
            return Tokenizer(vqvae_config(patch_nums=configs.patch_nums_of(config)))
        else:
            raise ValueError('config.tokenizer.checkpoint is empty: give a converted official VQVAE or a '
                             'tokenizer workdir, or set config.tokenizer.train to train one first')
    if not dry_run and (local / checkpoint.MODEL_FILE).exists():
        path = str(local)  # the copy sampling decodes with (`check_tokenizer`: it is the one named)
    vq, _ = checkpoint.load_model(path, tokenizer_only=True)
    inside = epath.Path(path).resolve() == local.resolve()
    if not inside and not dry_run and jax.process_index() == 0:
        checkpoint.save_model(local, vqvae=vq, source={'tokenizer': _same_path(path)})
    return Tokenizer(vq.config, nnx.state(vq, nnx.Param), TOKENIZER_DIR)


def var_config(config, vq_cfg: VQVAEConfig, source=None) -> VARConfig:
    """The VAR a run config trains on this tokenizer and data source (its class count; 1000 without)."""
    m = config.model
    if m.patch_nums and tuple(m.patch_nums) != tuple(vq_cfg.patch_nums):
        raise ValueError(f'config.model.patch_nums {tuple(m.patch_nums)} differ from the tokenizer\'s '
                         f'{vq_cfg.patch_nums}')
    if config.data.image_size != vq_cfg.image_size:
        raise ValueError(f'config.data.image_size is {config.data.image_size} but the tokenizer '
                         f'works on {vq_cfg.image_size}px images')
    return configs.var_model_config(m, vq_cfg, source.num_classes if source is not None else 1000)


# ---------------------------------------------------------------------------- the task
def build(config, source=None, *, tokenizer: Tokenizer, workdir=None,
          teacher_forcing: Callable | None = None) -> loop.Task:
    """The VAR task of `config` for the loop. `source`: the training data (its class count and
    names; None for a dry run). `workdir`: where the sample grids go (evaluation). `teacher_forcing`:
    `(microbatch, vq) -> (VAR input, targets)` instead of `encode_batch` (the benchmark of VAR alone
    reads them from the batch)."""
    # tokens made by another tokenizer would train VAR on the wrong codes without any visible error
    if isinstance(source, tokens.TokenSource):
        fp = None if tokenizer.params is None else tokens.tokenizer_fingerprint(tokenizer.config, tokenizer.params)
        tokens.check_matches(source.manifest, tokenizer.config, fp, source.path)
    var_cfg = var_config(config, tokenizer.config, source)
    vq_graphdef = nnx.split(abstract(tokenizer.config))[0]
    class_names = list(getattr(source, 'class_names', ()) or ())
    teacher_forcing = teacher_forcing or functools.partial(encode_batch, patch_nums=var_cfg.patch_nums)
    return loop.Task(
        name='var',
        model_configs={'vqvae': tokenizer.config, 'var': var_cfg, 'tokenizer': tokenizer.ref,
                       'class_names': class_names},
        optimizer=functools.partial(make_optimizer, config, var_cfg),
        init_params=lambda key: ({'var': nnx.state(VAR(var_cfg, rngs=nnx.Rngs(key)), nnx.Param)}, {}),
        train_step=functools.partial(train_step, config=config, var_cfg=var_cfg, vq_graphdef=vq_graphdef,
                                     teacher_forcing=teacher_forcing),
        batch_spec=batch_spec(config, tokenizer.config),
        # the tokenizer's weights; without (a dry run) their shapes
        frozen=nnx.state(abstract(tokenizer.config), nnx.Param) if tokenizer.params is None else tokenizer.params,
        export=('var',),
        # not in the official recipe (0 = off); samples, the score and exported weights use the EMA copy when on
        ema_decay=float(config.optim.get('ema', 0.0)),
        pretrained=functools.partial(pretrained, config, var_cfg),
        evaluate=functools.partial(sample_grid, config=config, var_cfg=var_cfg, vq_graphdef=vq_graphdef,
                                   class_names=class_names, workdir=workdir),
        progress_fields=lambda m: {k: m[k] for k in ('Lm', 'Lt', 'Accm', 'Acct', 'grad_norm', 'lr') if k in m},
        flops_per_image=metrics.var_flops_per_image(var_cfg),
        tokens_per_image=var_cfg.L,
        memory_knobs=('remat', 'grad_accum'))


def batch_spec(config, vq_cfg: VQVAEConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Images, or with data.source 'tokens' (var_jax/pretokenize.py) the token indices of each image."""
    if config.data.source != 'tokens':
        return loop.image_batch_spec(config.batch_size, config.data.image_size)
    L = sum(p * p for p in vq_cfg.patch_nums)  # noqa: N806  (the paper's L: tokens per image)
    return {'tokens': jax.ShapeDtypeStruct((config.batch_size, L), tokens.token_dtype(vq_cfg.vocab_size)),
            'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
            'skipped': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}


def make_optimizer(config, var_cfg: VARConfig, total_steps: int, steps_per_epoch: float):
    """AdamW with the official schedules; the peak lr is tblr x batch / 256 unless `optim.lr` is given."""
    o = config.optim
    peak = o.lr or o.tblr * config.batch_size / 256
    abs_params = {'var': nnx.state(abstract(var_cfg), nnx.Param)}
    tx = optim.make_optimizer(peak_lr=peak, max_it=total_steps, wp_it=o.wp_epochs * steps_per_epoch,
                              wd=o.wd, wd_end=o.wd_end, b1=o.b1, b2=o.b2, clip=o.clip, wp0=o.wp0, wpe=o.wpe,
                              sched=o.sched, mask=optim.decay_mask(abs_params))
    return finetune.with_frozen(tx, abs_params, config.get('finetune'))  # config.finetune.freeze: zero updates


def pretrained(config, var_cfg: VARConfig) -> dict:
    """config.init_from: the weights of a VAR of the same architecture, or of one with another class
    count (training/finetune.py: new class rows, optional freezing), or {}."""
    if not config.init_from:
        return {}
    return {'var': finetune.pretrained_var(config.init_from, var_cfg, config.get('finetune'))}


# ---------------------------------------------------------------------------- update
def encode_batch(mb, vq, *, patch_nums):
    """-> (VAR input x_BLCv_wo_first_l (B, L - pn_0^2, Cvae), target tokens (B, L)) of a
    microbatch: its pre-tokenized `tokens` (data.source='tokens') or the frozen tokenizer's
    encoding of its images (float32, no gradient)."""
    if 'tokens' in mb:  # pre-tokenized: only the codebook lookups and resizes below, no encoder
        flat = mb['tokens'].astype(jnp.int32)
        idx_list = [flat[:, b:e] for b, e in scale_bounds(patch_nums)]
    else:
        idx_list, _ = vq.quantize.tokenize(vq.encode(loop.images_to_float(mb['image'])))
    x_in = jax.lax.stop_gradient(vq.quantize.idx_to_var_input(idx_list))
    return x_in, jnp.concatenate(idx_list, axis=1)


def train_step(state, batch, frozen, tx, *, config, var_cfg: VARConfig, vq_graphdef, teacher_forcing):
    cfg = var_cfg
    graphdef = nnx.split(abstract(cfg))[0]
    vq = nnx.merge(vq_graphdef, frozen)
    ls = config.optim.label_smooth
    bounds = scale_bounds(cfg.patch_nums)

    def grad_fn(mb, key):
        x_in, target = teacher_forcing(mb, vq)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(mb['label'], x_in, train=True, rng=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)  # (B, L), float32
            if ls > 0:
                smooth = -jnp.mean(jax.nn.log_softmax(logits, -1), -1)
                loss = jnp.mean((1 - ls) * ce + ls * smooth)
            else:
                loss = jnp.mean(ce)
            return loss, (logits, ce)

        (loss, (logits, ce)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params['var'])
        hit = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
        per_scale_acc = jnp.stack([jnp.mean(hit[:, b:e]) for b, e in bounds]) * 100
        per_scale_ce = jnp.stack([jnp.mean(ce[:, b:e]) for b, e in bounds])
        pred_hist = jnp.zeros((cfg.vocab_size,), jnp.float32).at[jnp.argmax(logits, -1).reshape(-1)].add(1.0)
        m = {'loss': loss, 'Lm': jnp.mean(ce), 'Lt': per_scale_ce[-1], 'Accm': jnp.mean(hit) * 100,
             'Acct': per_scale_acc[-1], 'acc_scale': per_scale_acc, 'L_scale': per_scale_ce,
             'vocab_usage': jnp.mean(pred_hist / jnp.sum(pred_hist) > 0.001 / cfg.vocab_size) * 100}
        return {'var': g}, m

    grads, m = loop.accumulate_grads(grad_fn, batch, int(config.grad_accum), state.key())
    params, opt_state, gnorm = loop.apply_updates(state, grads, tx)
    hp = optim.current_hparams(opt_state)
    m.update(grad_norm=gnorm, lr=hp.get('lr', 0.0), wd=hp.get('wd', 0.0), skipped=jnp.sum(batch['skipped']))
    return state.replace(params=params, opt_state=opt_state), m


# ---------------------------------------------------------------------------- evaluation: a sample grid
def sample_grid(state, frozen, step, writer, final, *, config, var_cfg: VARConfig, vq_graphdef, class_names,
                workdir) -> dict:
    s = config.sample
    if s.per_class <= 0:
        return {}
    cfg = var_cfg
    classes = [c for c in s.classes if c < cfg.num_classes] or list(range(min(cfg.num_classes, 8)))
    var = nnx.merge(nnx.split(abstract(cfg))[0], state.ema.get('var', state.params['var']))
    vq = nnx.merge(vq_graphdef, frozen)
    labels = np.repeat(np.asarray(classes, np.int32), s.per_class)
    index = np.tile(np.arange(s.per_class), len(classes))
    settings = check_settings(s.cfg, s.top_k, s.top_p, s.more_smooth, prefix='sample.')
    images = batch.Sampler(var, vq, settings, s.seed, len(labels)).sample(labels, index)
    rows = [f'{c} {class_names[c]}' if c < len(class_names) else str(c) for c in classes]
    g = viz.grid(images, len(classes), s.per_class, row_labels=rows)
    if jax.process_index() == 0:
        viz.save_png(epath.Path(workdir) / 'samples' / f'step_{step:07d}.png', g)
        writer.image(step, 'samples', g)
    return {}


# ---------------------------------------------------------------------------- the workdir's tokenizer
# settings that do not change the tokenizer's weights (a rerun may change them freely)
_HARMLESS = ('log_every', 'checkpoint_every', 'keep_checkpoints', 'eval_every', 'eval_batches', 'max_nonfinite',
             'data.workers', 'mesh.')


def _same_path(path) -> str:
    """How a tokenizer path is recorded and compared: absolute, symlinks resolved (local paths)."""
    p = checkpoint.abspath(path)
    return str(p) if '://' in str(p) else os.path.realpath(os.fspath(p))


def _flat(d: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _tokenizer_model(model: dict) -> VQVAEConfig:
    """The VQVAEConfig a tokenizer run's saved `model` section describes, also in the keys of runs
    from before config.model took the dataclass's field names (`pn`: the resolution whose official
    scales an empty `patch_nums` stood for). Compared as dataclasses, a workdir of either kind
    resumes under the same settings."""
    fields = {f.name for f in dataclasses.fields(VQVAEConfig)}
    m = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k in fields}
    if not m.get('patch_nums') and model.get('pn') in PATCH_NUMS:
        m['patch_nums'] = PATCH_NUMS[model['pn']]
    return VQVAEConfig(**m)


def check_tokenizer(config, workdir) -> None:
    """The workdir's `tokenizer/` must be the one the config names, and must not change under a VAR
    that has trained on it (sampling decodes with that copy; VAR's tokens come from it). Each
    mismatch is an error saying what differs; nothing is replaced or retrained silently.

    (a) a copy of checkpoint A (model.json `source`), and the config now names B or asks to train
        one; or a tokenizer trained here, and the config now names a checkpoint;
    (b) a tokenizer trained here under existing VAR steps, and `tokenizer.train` now differs from
        the settings it was trained with (its config.json), e.g. a higher `total_steps`."""
    local = epath.Path(workdir) / TOKENIZER_DIR
    if not (local / checkpoint.MODEL_FILE).exists() and not (local / 'config.json').exists():
        return
    meta = checkpoint.read_model_json(local)[2] if (local / checkpoint.MODEL_FILE).exists() else {}
    copied = (meta.get('source') or {}).get('tokenizer')
    given = config.tokenizer.checkpoint
    hint = 'use a new workdir, or the settings of the first run'
    if given:
        if _same_path(given) == _same_path(local):
            return
        if copied and _same_path(copied) != _same_path(given):
            raise ValueError(f'config.tokenizer.checkpoint is {given} but {local} (what this workdir trained and '
                             f'samples with) is a copy of {copied}; {hint}')
        if not copied and (local / checkpoint.CHECKPOINTS).exists():
            raise ValueError(f'config.tokenizer.checkpoint is {given} but this workdir trained its own tokenizer '
                             f'in {local}; {hint}')
        return
    if not config.tokenizer.get('train'):
        return
    if copied:
        raise ValueError(f'the config asks to train a tokenizer (config.tokenizer.checkpoint is empty) but {local} '
                         f'is a copy of {copied}; {hint}')
    saved = local / 'config.json'
    var_steps = epath.Path(workdir) / checkpoint.CHECKPOINTS
    if not saved.exists() or not (var_steps.exists() and any(p.name.isdigit() for p in var_steps.iterdir())):
        return  # VAR has not trained yet: the tokenizer may still change (it resumes)
    old, new = json.loads(saved.read_text()), json.loads(config.tokenizer.train.to_json_best_effort())
    old_model, new_model = _tokenizer_model(old.pop('model', {})), _tokenizer_model(new.pop('model', {}))
    diff = [f'model.{k} {v} -> {getattr(new_model, k)}' for k, v in dataclasses.asdict(old_model).items()
            if v != getattr(new_model, k)]
    old, new = _flat(old), _flat(new)
    diff += [f'{k} {old.get(k, "(unset)")} -> {new.get(k, "(unset)")}' for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not k.startswith(_HARMLESS)]
    if diff:
        raise ValueError(f'config.tokenizer.train differs from the tokenizer in {local} that VAR has trained on '
                         f'({"; ".join(diff)}); training it again would change the frozen tokenizer under the saved '
                         f'VAR steps: {hint}')


# ---------------------------------------------------------------------------- the command
def run(config, workdir, *, dry_run: bool = False, device_memory_gib: float = 0.0,
        kill_after_step: int | None = None) -> dict:
    """Train the tokenizer first when the config asks for it, then VAR; returns final metrics.

    Config, workdir and data are checked before anything is written; a run that still fails on a
    config or data error before training leaves no workdir behind (configs.fresh_workdir_guard).
    One run at a time per workdir (loop.workdir_lock, held over both phases). `dry_run`: compile
    only and report the memory (`loop.dry_run_report`; `device_memory_gib` pretends the target
    device's). `kill_after_step`: fault injection for tests (`loop.train`), in the VAR phase.
    """
    configs.check(config, 'var')
    configs.check_workdir(workdir)
    train_tok = not config.tokenizer.checkpoint and config.tokenizer.get('train') and not dry_run
    if not dry_run:  # a wrong data path fails now, not after the tokenizer was trained
        make_source(config.data, 'train')
        if train_tok and config.tokenizer.train.get('data') is not None:
            make_source(config.tokenizer.train.data, 'train')
    config = own_data.resolve(config)  # the tokenizer phase reads config.data; other data is an error
    if train_tok:
        configs.check(config.tokenizer.train, 'tokenizer')
        configs.check_workdir(epath.Path(workdir) / TOKENIZER_DIR)
    with configs.fresh_workdir_guard(workdir):
        distributed.maybe_initialize()  # before the tokenizer is loaded: that touches the backend
        workdir = checkpoint.abspath(workdir)
        if dry_run:  # abstract shapes only: no data, no weights, nothing written
            tok = resolve_tokenizer(config, workdir, dry_run=True)
            return loop.dry_run_report(config, functools.partial(build, tokenizer=tok, workdir=workdir),
                                       device_memory_gib=device_memory_gib)
        with loop.workdir_lock(workdir):
            return _train(config, workdir, train_tok=train_tok, kill_after_step=kill_after_step)


def _train(config, workdir, *, train_tok: bool, kill_after_step: int | None) -> dict:
    check_tokenizer(config, workdir)
    if not config.tokenizer.checkpoint and config.data.source == 'tokens' \
            and not (workdir / TOKENIZER_DIR / checkpoint.MODEL_FILE).exists():
        # training a new tokenizer here could never match the tokens (var_jax/data/tokens.py)
        made_by = tokens.read_manifest(config.data.path).get('tokenizer_path', '?')
        raise ValueError(f'data.source tokens: set config.tokenizer.checkpoint to the tokenizer that made the '
                         f'tokens in {config.data.path} (their manifest names {made_by})')
    if train_tok:
        own_data.announce('tokenizer', config.tokenizer.train.data)
        tokenizer_task.train(config.tokenizer.train, workdir / TOKENIZER_DIR)
    tok = resolve_tokenizer(config, workdir)
    own_data.announce('var', config.data)
    out, already_complete = loop.train(config, workdir, functools.partial(build, tokenizer=tok, workdir=workdir),
                                       kill_after_step=kill_after_step)
    if config.get('evaluate'):
        if jax.process_count() > 1:  # the score samples on one host's devices
            print('[eval] skipped in a multi-process run: python -m var_jax.evaluate --workdir ' + str(workdir))
        elif config.data.source == 'imagefolder':  # the judge trained on this folder (eval/folder_score.py)
            out.update(folder_score.for_run(config, workdir, complete=already_complete))
        else:
            from var_jax.eval import builtin_score  # noqa: PLC0415

            s = config.sample
            settings = dict(per_class=config.get('score_per_class', 100), cfg=s.cfg, top_k=s.top_k,
                            top_p=s.top_p, seed=s.seed)
            stored = builtin_score.stored_score(workdir, **settings) if already_complete else None
            if stored is not None:
                print(f'[eval] score of this finished run, from {workdir / builtin_score.EVAL_FILE}', flush=True)
            out.update(stored or builtin_score.evaluate_workdir(workdir, **settings))
    if jax.process_index() == 0:
        print(summary(workdir, out), flush=True)
    return out


def summary(workdir, out: dict) -> str:
    w = epath.Path(workdir)
    samples = sorted((w / 'samples').glob('*.png')) if (w / 'samples').exists() else []
    lines = [f'done: {w}', f'  checkpoints      {w / checkpoint.CHECKPOINTS}',
             f'  metrics          {w / "metrics.jsonl"} and {w / "tensorboard"}']
    if (w / TOKENIZER_DIR).exists():
        lines.append(f'  tokenizer        {w / TOKENIZER_DIR}')
    if samples:
        lines.append(f'  sample grid      {samples[-1]}')
    for k in ('Lm', 'Accm', 'Acct'):
        if k in out:
            lines.append(f'  final {k:<10} {out[k]:.4g}')
    for k, v in out.items():
        if k.startswith('eval/'):
            lines.append(f'  {k:<16} {v:.4g}')
    return '\n'.join(lines)
