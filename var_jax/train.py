"""Train VAR: `python -m var_jax.train --config=configs/d20.py --workdir=DIR [--dry_run]`.

The step (official `VARTrainer.train_step`): the frozen tokenizer turns images into per-scale
tokens (float32) -> teacher-forcing input -> VAR forward (label dropout, drop-path) in the compute
dtype -> mean cross-entropy over all L tokens -> AdamW. Logged as the official trainer does:
Lm, Lt (last scale), Accm, Acct, grad norm (pre-clip), lr, per-scale accuracy and loss,
vocabulary usage, images/s, tokens/s and TFLOP/s.

With `data.source='tokens'` (a directory of `python -m var_jax.pretokenize`) the batches carry the
tokens instead of images and the step starts at the teacher-forcing input (codebook lookups,
bicubic up / area down, the Phi convs: official `idxBl_to_var_input`), skipping the encoder.
"""
from __future__ import annotations

import json
import os
import sys

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
from var_jax.models import VAR, VARConfig, abstract, vqvae_config
from var_jax.models.var import scale_bounds
from var_jax.parallel import distributed, sharding
from var_jax.sampling import generate
from var_jax.training import configs, finetune, loop, optim, own_data
from var_jax.utils import cli, metrics, viz

TOKENIZER_DIR = 'tokenizer'


class VARTask(loop.Task):
    name = 'var'
    export = ('var',)
    memory_knobs = ('remat', 'grad_accum')

    def __init__(self, config, workdir, *, dry_run: bool = False, tokenizer=None):
        """`tokenizer`: a VQVAE to use as is instead of config.tokenizer (benchmarks)."""
        super().__init__(config, workdir)
        self.dry_run = dry_run
        if tokenizer is not None:
            self.vq_cfg, self.vq_params, self.tokenizer_ref = tokenizer.config, nnx.state(tokenizer, nnx.Param), None
        else:
            self.vq_cfg, self.vq_params, self.tokenizer_ref = self._tokenizer()
        self.vq_graphdef = nnx.split(abstract(self.vq_cfg))[0]
        self.source = None

    # ------------------------------------------------------------------ pre-tokenized input
    @property
    def from_tokens(self) -> bool:
        """Batches carry token indices (data.source 'tokens', var_jax/pretokenize.py), not images."""
        return self.config.data.source == 'tokens'

    @property
    def source(self):
        return self._source

    @source.setter
    def source(self, source):
        # the trainer hands over the data source before anything is built: tokens made by another
        # tokenizer would train VAR on the wrong codes without any visible error
        if isinstance(source, tokens.TokenSource):
            fp = None if self.vq_params is None else tokens.tokenizer_fingerprint(self.vq_cfg, self.vq_params)
            tokens.check_matches(source.manifest, self.vq_cfg, fp, source.path)
        self._source = source

    def batch_spec(self, batch_size, image_size):
        if not self.from_tokens:
            return super().batch_spec(batch_size, image_size)
        L = sum(p * p for p in self.vq_cfg.patch_nums)
        return {'tokens': jax.ShapeDtypeStruct((batch_size, L), tokens.token_dtype(self.vq_cfg.vocab_size)),
                'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                'skipped': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    # ------------------------------------------------------------------ models
    def _tokenizer(self):
        """-> (config, float32 params or None for a dry run, path recorded in model.json)."""
        tcfg = self.config.tokenizer
        path = tcfg.checkpoint
        if not path:
            local = self.workdir / TOKENIZER_DIR
            if (local / checkpoint.MODEL_FILE).exists():
                path = str(local)
            elif self.dry_run and tcfg.get('train'):  # the tokenizer this run would train first

                return configs.vqvae_model_config(tcfg.train.model), None, None
            elif self.dry_run:  # compile against the official-size tokenizer; no weights needed
                return vqvae_config(patch_nums=configs.patch_nums_of(self.config)), None, None
            else:
                raise ValueError('config.tokenizer.checkpoint is empty: give a converted official VQVAE or a '
                                 'tokenizer workdir, or set config.tokenizer.train to train one first')
        local = self.workdir / TOKENIZER_DIR
        if not self.dry_run and (local / checkpoint.MODEL_FILE).exists():
            path = str(local)  # the copy sampling decodes with (`check_tokenizer`: it is the one named)
        vq, _ = checkpoint.load_model(path, tokenizer_only=True)
        inside = epath.Path(path).resolve() == local.resolve()
        if not inside and not self.dry_run and jax.process_index() == 0:
            checkpoint.save_model(local, vqvae=vq, source={'tokenizer': _same_path(path)})
        return vq.config, nnx.state(vq, nnx.Param), TOKENIZER_DIR

    @property
    def var_cfg(self) -> VARConfig:
        m, vq = self.config.model, self.vq_cfg
        if m.patch_nums and tuple(m.patch_nums) != tuple(vq.patch_nums):
            raise ValueError(f'config.model.patch_nums {tuple(m.patch_nums)} differ from the tokenizer\'s '
                             f'{vq.patch_nums}')
        if self.config.data.image_size != vq.image_size:
            raise ValueError(f'config.data.image_size is {self.config.data.image_size} but the tokenizer '
                             f'works on {vq.image_size}px images')
        return configs.var_model_config(m, vq, self.source.num_classes if self.source is not None else 1000)

    def model_configs(self):
        return {'vqvae': self.vq_cfg, 'var': self.var_cfg, 'tokenizer': self.tokenizer_ref,
                'class_names': list(getattr(self.source, 'class_names', ()) or ())}

    def optimizer(self, total_steps, steps_per_epoch):
        o = self.config.optim
        peak = o.lr or o.tblr * self.config.batch_size / 256
        self.peak_lr = peak
        abs_params = {'var': nnx.state(abstract(self.var_cfg), nnx.Param)}
        tx = optim.make_optimizer(peak_lr=peak, max_it=total_steps, wp_it=o.wp_epochs * steps_per_epoch,
                                  wd=o.wd, wd_end=o.wd_end, b1=o.b1, b2=o.b2, clip=o.clip, wp0=o.wp0, wpe=o.wpe,
                                  sched=o.sched, mask=optim.decay_mask(abs_params))
        return finetune.with_frozen(tx, abs_params, self.config.get('finetune'))

    def init_params(self, key):
        return {'var': nnx.state(VAR(self.var_cfg, rngs=nnx.Rngs(key)), nnx.Param)}, {}

    def ema_decay(self):
        # not in the official recipe (0 = off); samples, the score and exported weights use the EMA copy when on
        return float(self.config.optim.get('ema', 0.0))

    def pretrained(self):
        if not self.config.init_from:
            return {}
        return {'var': finetune.pretrained_var(self.config.init_from, self.var_cfg, self.config.get('finetune'))}

    def frozen(self, mesh):
        rep = sharding.replicated(mesh)
        if self.vq_params is None:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                nnx.state(abstract(self.vq_cfg), nnx.Param))
        return sharding.put(self.vq_params, rep)

    # ------------------------------------------------------------------ update
    def teacher_forcing(self, mb, vq):
        """-> (VAR input x_BLCv_wo_first_l (B, L - pn_0^2, Cvae), target tokens (B, L)) of a
        microbatch: its pre-tokenized `tokens` (data.source='tokens') or the frozen tokenizer's
        encoding of its images (float32, no gradient). The benchmark
        of VAR alone (`var_jax.benchmarks`) overrides this to read given tokens instead."""
        if 'tokens' in mb:  # pre-tokenized: only the codebook lookups and resizes below, no encoder
            flat = mb['tokens'].astype(jnp.int32)
            idx_list = [flat[:, b:e] for b, e in scale_bounds(self.var_cfg.patch_nums)]
        else:
            idx_list, _ = vq.quantize.tokenize(vq.encode(loop.images_to_float(mb['image'])))
        x_in = jax.lax.stop_gradient(vq.quantize.idx_to_var_input(idx_list))
        return x_in, jnp.concatenate(idx_list, axis=1)

    def train_step(self, state, batch, frozen, tx):
        cfg = self.var_cfg
        graphdef = nnx.split(abstract(cfg))[0]
        vq = nnx.merge(self.vq_graphdef, frozen)
        ls = self.config.optim.label_smooth
        bounds = scale_bounds(cfg.patch_nums)

        def grad_fn(mb, key):
            x_in, target = self.teacher_forcing(mb, vq)

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

        grads, m = loop.accumulate_grads(grad_fn, batch, int(self.config.grad_accum), state.key())
        params, opt_state, gnorm = loop.apply_updates(state, grads, tx)
        hp = optim.current_hparams(opt_state)
        m.update(grad_norm=gnorm, lr=hp.get('lr', 0.0), wd=hp.get('wd', 0.0), skipped=jnp.sum(batch['skipped']))
        return state.replace(params=params, opt_state=opt_state), m

    def flops_per_image(self):
        return metrics.var_flops_per_image(self.var_cfg)

    def throughput(self, images_per_sec):
        return {'tokens_per_sec': images_per_sec * self.var_cfg.L}

    def progress_fields(self, m):
        return {k: m[k] for k in ('Lm', 'Lt', 'Accm', 'Acct', 'grad_norm', 'lr') if k in m}

    # ------------------------------------------------------------------ evaluation: a sample grid
    def evaluate(self, state, frozen, step, writer, final):
        s = self.config.sample
        if s.per_class <= 0:
            return {}
        cfg = self.var_cfg
        classes = [c for c in s.classes if c < cfg.num_classes] or list(range(min(cfg.num_classes, 8)))
        var = nnx.merge(nnx.split(abstract(cfg))[0], state.ema.get('var', state.params['var']))
        vq = nnx.merge(self.vq_graphdef, frozen)
        labels = np.repeat(np.asarray(classes, np.int32), s.per_class)
        keys = generate.image_keys(s.seed, labels, np.tile(np.arange(s.per_class), len(classes)))
        images, _ = generate.sample(var, vq, labels, keys, cfg=s.cfg, top_k=s.top_k, top_p=s.top_p,
                                    more_smooth=s.more_smooth)
        images = gather(images)
        names = self.model_configs()['class_names']
        rows = [f'{c} {names[c]}' if c < len(names) else str(c) for c in classes]
        g = viz.grid(images, len(classes), s.per_class, row_labels=rows)
        if jax.process_index() == 0:
            viz.save_png(self.workdir / 'samples' / f'step_{step:07d}.png', g)
            writer.image(step, 'samples', g)
        return {}


def gather(x) -> np.ndarray:
    """A (possibly multi-process) jax array as a host numpy array on every process."""
    if getattr(x, 'is_fully_addressable', True):
        return np.asarray(x)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
    old = _flat(json.loads(saved.read_text()))
    new = _flat(json.loads(config.tokenizer.train.to_json_best_effort()))
    diff = [f'{k} {old.get(k, "(unset)")} -> {new.get(k, "(unset)")}' for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(_HARMLESS)]
    if diff:
        raise ValueError(f'config.tokenizer.train differs from the tokenizer in {local} that VAR has trained on '
                         f'({"; ".join(diff)}); training it again would change the frozen tokenizer under the saved '
                         f'VAR steps: {hint}')


# ---------------------------------------------------------------------------- entry point
def run(config, workdir, *, dry_run: bool = False, device_memory_gib: float = 0.0) -> dict:
    """Train the tokenizer first when the config asks for it, then VAR; returns final metrics.

    Config, workdir and data are checked before anything is written; a run that still fails on a
    config or data error before training leaves no workdir behind (configs.fresh_workdir_guard).
    One run at a time per workdir (loop.workdir_lock, held over both phases).
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
    with configs.fresh_workdir_guard(workdir):
        distributed.maybe_initialize()  # before the tokenizer is loaded: that touches the backend
        workdir = checkpoint.abspath(workdir)
        if dry_run:
            task = VARTask(config, workdir, dry_run=True)
            return loop.run(task, config, workdir, dry_run=True, device_memory_gib=device_memory_gib)
        with loop.workdir_lock(workdir):
            return _run(config, workdir, train_tok=train_tok)


def _run(config, workdir, *, train_tok: bool) -> dict:
    check_tokenizer(config, workdir)
    if not config.tokenizer.checkpoint and config.data.source == 'tokens' \
            and not (workdir / TOKENIZER_DIR / checkpoint.MODEL_FILE).exists():
        # training a new tokenizer here could never match the tokens (var_jax/data/tokens.py)
        made_by = tokens.read_manifest(config.data.path).get('tokenizer_path', '?')
        raise ValueError(f'data.source tokens: set config.tokenizer.checkpoint to the tokenizer that made the '
                         f'tokens in {config.data.path} (their manifest names {made_by})')
    if train_tok:
        from var_jax import train_tokenizer  # noqa: PLC0415

        own_data.announce('tokenizer', config.tokenizer.train.data)
        train_tokenizer.run(config.tokenizer.train, workdir / TOKENIZER_DIR)
    own_data.announce('var', config.data)
    task = VARTask(config, workdir)
    out = loop.run(task, config, workdir)
    if config.get('evaluate'):
        if jax.process_count() > 1:  # the score samples on one host's devices
            print('[eval] skipped in a multi-process run: python -m var_jax.evaluate --workdir ' + str(workdir))
        elif config.data.source == 'imagefolder':  # the judge trained on this folder (eval/folder_score.py)
            out.update(folder_score.for_run(config, workdir, complete=task.already_complete))
        else:
            from var_jax.eval import builtin_score  # noqa: PLC0415

            s = config.sample
            settings = dict(per_class=config.get('score_per_class', 100), cfg=s.cfg, top_k=s.top_k,
                            top_p=s.top_p, seed=s.seed)
            stored = builtin_score.stored_score(workdir, **settings) if task.already_complete else None
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


def main(argv):
    from absl import flags  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    sys.exit(cli.run(lambda: run(f.config, f.workdir, dry_run=f.dry_run, device_memory_gib=f.dry_run_memory_gib) and 0))


if __name__ == '__main__':
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'training config file', lock_config=True)
    flags.DEFINE_string('workdir', None, 'output directory (local or gs://); re-running resumes', required=True)
    flags.DEFINE_bool('dry_run', False, 'compile the sharded step from abstract shapes, print memory, exit')
    flags.DEFINE_float('dry_run_memory_gib', 0.0, 'with --dry_run: the memory of one target device in GiB (default: '
                       'what the device reports; a CPU reports none), to say which settings fit')
    app.run(main, flags_parser=configs.parse_flags)
