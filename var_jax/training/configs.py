"""Training configs (ml_collections) for both trainers, and their validation.

`configs/*.py` are one-liners over these builders, so each recipe reads like the official table:
    d16  bs 768  ep 200  tblr 1e-4  alng 1e-3  wpe 0.1
    d20  bs 768  ep 250  tblr 1e-4  alng 1e-3  wpe 0.1
    d24  bs 768  ep 350  tblr 8e-5  alng 1e-4  wpe 0.01
    d30  bs 1024 ep 350  tblr 8e-5  alng 1e-5  wpe 0.01  twde 0.08
    d36  bs 768  ep 350  tblr 8e-5  alng 5e-6  wpe 0.01  twde 0.08  saln, 512px
Peak lr = tblr * batch_size / 256; warm-up ep/50 epochs from 0.5 %; `lin0` decay; AdamW
(0.9, 0.95), wd 0.05 -> twde (cosine); grad clip 2; bf16 compute with float32 parameters.
The official names in the table are config keys here as follows: alng -> model.init_adaln_gamma
(official --alng; its --aln is model.init_adaln, 0.5), tblr -> optim.tblr, wpe -> optim.wpe,
twde -> optim.wd_end, saln -> model.shared_aln, 512px (official --pn=512) -> data.image_size=512.

`config.model` holds the model dataclass's fields by their own names (VARConfig / VQVAEConfig in
var_jax/models/config.py; every field is a key, with the dataclass default unless the recipe says
otherwise), so a new model field needs one edit, the dataclass. A VAR run takes vocab_size, cvae and
patch_nums from its tokenizer (`model.patch_nums` () = the tokenizer's) and the class count from the
data (`model.num_classes` 0); without a tokenizer to ask (a dry run) the scales are the official
ones of `data.image_size` (`patch_nums_of`). A tokenizer run names its scales in `model.patch_nums`.

The text after ':' in --config=configs/d16.py:runlocal selects variants; every config parses it with
`parse_arg` (typed, unknown names are an error): `runlocal` shrinks the batch and steps for a smoke
test on one machine.

`mesh.logical_axis_rules` maps the models' logical axis names onto the mesh axes (maxtext's
`logical_axis_rules`; default `var_jax.parallel.sharding.DEFAULT_RULES`); a rule given replaces the
default of the name it names, e.g. --config.mesh.logical_axis_rules="(('embed', None),)" replicates
the weights that FSDP would split.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import traceback

from ml_collections import ConfigDict

from var_jax.models import PATCH_NUMS, VARConfig, VQVAEConfig
from var_jax.parallel import sharding

DATA_SOURCES = ('builtin', 'imagefolder', 'tfds', 'tokens')  # tokens: VAR only (python -m var_jax.pretokenize)


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ConfigDict:
    """The text after ':' in `--config=FILE:ARG`, as typed values (big_vision's `parse_arg` style).

    `spec` names every argument the config knows, with its default; the default's type converts the
    text (bool, int, float, str), or give `(default, converter)`. `ARG` is comma-separated
    `name=value` items; a bare `name` means `name=True` (for a bool):

        parse_arg('runlocal,res=128', runlocal=False, res=256)  ->  runlocal=True, res=128

    An argument not in `spec` is a ValueError naming the known ones (a typo must not silently run
    the full recipe), unless `lazy`: then it is kept with a literal-guessed type.
    """
    known = {k: v if isinstance(v, tuple) else (v, _converter(v)) for k, v in spec.items()}
    out = ConfigDict({k: d for k, (d, _) in known.items()}, type_safe=False)
    for part in (arg or '').split(','):
        part = part.strip()
        if not part:
            continue
        name, eq, text = part.partition('=')
        name = name.strip()
        if name not in known:
            if not lazy:
                where = f' in {arg!r}' if arg.strip() != name else ''
                raise ValueError(f'unknown config argument {name!r}{where} (known: '
                                 f'{", ".join(sorted(known)) or "none"})')
            out[name] = _literal(text) if eq else True
            continue
        default, convert = known[name]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f'config argument {name} needs a value ({name}=...)')
            text = 'True'
        try:
            out[name] = convert(text)
        except ValueError as e:
            raise ValueError(f'config argument {name}={text}: {e}') from None
    return out


def _converter(default):
    if isinstance(default, bool):
        return _bool
    if isinstance(default, (int, float)):
        kind = type(default)

        def convert(text):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f'expected {kind.__name__}') from None

        return convert
    return str


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ('1', 'true', 'yes', 'on'):
        return True
    if t in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError('expected a bool (true/false)')


def _literal(text: str):
    import ast  # noqa: PLC0415

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def data_config(*, source='tfds', image_size=256, hflip=False, workers=8, **kw) -> ConfigDict:
    c = ConfigDict(dict(source=source, image_size=image_size, hflip=hflip, workers=workers,
                        name='imagenet2012', data_dir='', train_split='train', eval_split='validation',
                        path='', eval_path='', buffer_mb=1024))  # prefetched batches per process / worker
    c.update(kw)
    return c


def common(c: ConfigDict, *, batch_size: int, epochs: float) -> ConfigDict:
    c.seed = 0
    c.batch_size = batch_size
    c.epochs = epochs
    c.total_steps = 0  # > 0 overrides epochs
    c.grad_accum = 1
    # num_devices 0 = all; logical_axis_rules: (logical name, mesh axis | None | tuple of axes) pairs
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0, logical_axis_rules=sharding.DEFAULT_RULES))
    c.log_every = 50
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    c.eval_every = 0
    c.max_nonfinite = 20
    return c


def model_section(cls, *, exclude: tuple[str, ...] = (), **values) -> ConfigDict:
    """`config.model` for the dataclass `cls`: every field by its name with its default, then `values`;
    `exclude` names the fields the run fills from elsewhere (never set in the config)."""
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f'{cls.__name__} has no field {unknown[0]!r}')
    return ConfigDict({**fields, **values})


# the fields of a VAR run that its tokenizer decides (`var_model_config`); patch_nums stays a key: () = the tokenizer's
_FROM_TOKENIZER = ('vocab_size', 'cvae')


def var_recipe(*, depth: int, batch_size: int, epochs: float, tblr: float, alng: float, wpe: float,
               twde: float = 0.05, image_size: int = 256, runlocal: bool = False) -> ConfigDict:
    """The official VAR-d{depth} recipe on ImageNet (TFDS); see the table above (`alng` is
    `model.init_adaln_gamma`, `image_size` the official --pn)."""
    c = common(ConfigDict(), batch_size=batch_size, epochs=epochs)
    c.model = model_section(VARConfig, exclude=_FROM_TOKENIZER, depth=depth, width=0, num_heads=0,
                            shared_aln=depth == 36, patch_nums=(), num_classes=0, dtype='bfloat16', attention='xla',
                            remat='none', scan_layers=True, cond_drop_rate=0.1, drop_path_rate=-1.0, init_adaln=0.5,
                            init_adaln_gamma=alng)
    # the frozen tokenizer: a converted official checkpoint, a tokenizer workdir, or '' to train one
    # first with `tokenizer_train` (only sensible for small data such as the built-in set)
    # allow_other_data: let tokenizer.train.data name other images than config.data (training/own_data.py)
    c.tokenizer = ConfigDict(dict(checkpoint='', train=ConfigDict(), allow_other_data=False))
    c.init_from = ''  # converted official VAR checkpoint to fine-tune from
    c.data = data_config(image_size=image_size)
    # ema: decay of an EMA copy of the VAR weights; 0 (off) is the official recipe. When on, sample
    # grids, the built-in score and exported weights use the EMA copy.
    c.optim = ConfigDict(dict(tblr=tblr, lr=0.0, wd=0.05, wd_end=twde, wp_epochs=epochs / 50, wp0=0.005, wpe=wpe,
                              sched='lin0', clip=2.0, b1=0.9, b2=0.95, label_smooth=0.0, ema=0.0))
    c.sample = ConfigDict(dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4, cfg=4.0, top_k=900,
                               top_p=0.95, seed=0, more_smooth=False))
    c.evaluate = False  # after training: the built-in classifier scores (built-in data only)
    if runlocal:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 20, 5, 10
        c.data.workers = 0
    return c


def tokenizer_recipe(*, runlocal: bool = False) -> ConfigDict:
    """Official-architecture multi-scale VQVAE (ch 160, V 4096, Cvae 32, 256px) on ImageNet."""
    c = common(ConfigDict(), batch_size=256, epochs=100)
    c.model = model_section(VQVAEConfig, vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4),
                            num_res_blocks=2, using_sa=True, using_mid_sa=True, num_groups=32, beta=0.25,
                            using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4,
                            patch_nums=PATCH_NUMS[256], dtype='float32')
    c.init_from = ''  # a converted official VQVAE (fine-tuning, e.g. on a new domain)
    c.data = data_config(image_size=256, hflip=True)
    c.optim = ConfigDict(dict(lr=1e-4, wd=0.0, wd_end=0.0, b1=0.5, b2=0.9, clip=0.0, warmup_steps=1000,
                              sched='const', disc_lr=1e-4))
    c.loss = ConfigDict(dict(l1=1.0, l2=0.0, vq=1.0, lpips=1.0, lpips_weights='', gan=0.5, gan_start=20_000,
                             disc_ch=64, disc_layers=3, adaptive_weight=True, ema=0.0))
    c.codebook = ConfigDict(dict(reseed=True, reseed_every=200, dead_threshold=0.03, usage_decay=0.99))
    c.eval_batches = 8  # held-out batches for PSNR / LPIPS / usage
    if runlocal:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 4, 10, 5, 10
        c.data.workers = 0
    return c


def tokenizer_tiny(*, runlocal: bool = False) -> ConfigDict:
    """A small tokenizer for 32px built-in images: 4x downsampling, 8x8 latent, six scales.

    Sized for a 2-core CPU (about 3 minutes): 16 base channels (GroupNorm with 8 groups), no
    attention, batch 16 for 1200 steps at lr 5e-3; plain MSE + VQ loss (no LPIPS / GAN). V = 128:
    reconstructions as good as with 512 codes, and a VAR learns the smaller vocabulary faster.
    Measured: ~20 dB held-out PSNR (docs/builtin_default.md).
    """
    c = tokenizer_recipe()
    c.model.update(vocab_size=128, z_channels=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8,
                   using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 3, 4, 6, 8))
    c.data = data_config(source='builtin', image_size=32, workers=0)
    c.batch_size, c.epochs, c.total_steps = 16, 0, 1200
    c.optim.update(lr=5e-3, warmup_steps=20, sched='cos', b1=0.9, b2=0.99)
    c.loss.update(lpips=0.0, gan=0.0, l2=1.0, l1=0.0)
    c.codebook.update(reseed_every=50)
    c.log_every, c.checkpoint_every, c.eval_batches = 100, 400, 4
    if runlocal:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 4, 10, 5, 10
    return c


def check(config: ConfigDict, kind: str) -> None:
    """Raise ValueError naming the first bad value (called before anything is built)."""

    def need(cond, msg):
        if not cond:
            raise ValueError(f'config: {msg}')

    need(config.batch_size >= 1, f'batch_size must be >= 1, got {config.batch_size}')
    need(config.total_steps >= 0 and config.epochs >= 0, 'epochs and total_steps must be >= 0')
    need(config.total_steps > 0 or config.epochs > 0, 'set epochs or total_steps')
    need(config.grad_accum >= 1, f'grad_accum must be >= 1, got {config.grad_accum}')
    need(config.log_every >= 1 and config.checkpoint_every >= 1, 'log_every and checkpoint_every must be >= 1')
    d = config.data
    need(d.source in DATA_SOURCES, f'data.source must be one of {DATA_SOURCES}, got {d.source!r}')
    need(d.source != 'imagefolder' or d.path, 'data.path must name the image folder (root/<class>/<image>)')
    need(d.source != 'tokens' or d.path, 'data.path must name the token directory (python -m var_jax.pretokenize)')
    need(d.source != 'tokens' or kind == 'var', 'data.source tokens trains VAR only; a tokenizer needs images')
    need(d.workers >= 0, f'data.workers must be >= 0, got {d.workers}')
    need(d.get('buffer_mb', 1024) > 0, f'data.buffer_mb must be > 0, got {d.get("buffer_mb")}')
    m = config.model
    try:
        _model_fields(m, VARConfig if kind == 'var' else VQVAEConfig)
        sharding.check_rules(config.mesh.get('logical_axis_rules', ()))
    except ValueError as e:
        need(False, str(e).removeprefix('config.'))
    if kind == 'tokenizer':
        need(len(m.patch_nums) > 0, f'model.patch_nums must name the scales, e.g. {PATCH_NUMS[256]} for 256px images')
    if kind == 'var':
        o = config.optim
        need(o.tblr > 0 or o.lr > 0, 'optim.tblr (or optim.lr) must be > 0')
        need(0 <= o.label_smooth < 1, f'optim.label_smooth must be in [0, 1), got {o.label_smooth}')
        need(0 <= o.get('ema', 0.0) < 1, f'optim.ema must be in [0, 1) (0 = off), got {o.get("ema")}')
        need(o.sched in ('lin0', 'cos', 'const'), f"optim.sched must be 'lin0', 'cos' or 'const', got {o.sched!r}")
        need(m.depth >= 1, f'model.depth must be >= 1, got {m.depth}')
        need(m.dtype in ('float32', 'bfloat16', 'float16'), f'model.dtype {m.dtype!r} is not a float dtype')


def vqvae_model_config(model_cfg) -> VQVAEConfig:
    """The tokenizer's model dataclass from `config.model` of a tokenizer run (its keys are the fields)."""
    return VQVAEConfig(**_model_fields(model_cfg, VQVAEConfig))


def var_model_config(model_cfg, vq: VQVAEConfig, num_classes: int) -> VARConfig:
    """The VAR dataclass from `config.model` of a VAR run; vocabulary, latent channels and scales
    come from its tokenizer `vq` (a value given in the config must agree), the class count from the
    data when `model.num_classes` is 0."""
    fields = _model_fields(model_cfg, VARConfig)
    for name, theirs in dict(vocab_size=vq.vocab_size, cvae=vq.z_channels, patch_nums=vq.patch_nums).items():
        if fields.get(name) and fields[name] != theirs:
            raise ValueError(f'config.model.{name} {fields[name]} differs from the tokenizer\'s {theirs}')
        fields[name] = theirs
    fields['num_classes'] = fields.get('num_classes') or num_classes
    return VARConfig(**fields)


def _model_fields(model_cfg, cls) -> dict:
    """`config.model` as keyword arguments of `cls` (lists as tuples); a key that is not a field is a
    ValueError naming it and the fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in model_cfg.items()}
    unknown = sorted(set(out) - fields)
    if unknown:
        raise ValueError(f'config.model.{unknown[0]} is not a {cls.__name__} field '
                         f'(known: {", ".join(sorted(fields))})')
    return out


def patch_nums_of(config) -> tuple[int, ...]:
    """The scales of a run without a tokenizer to ask: `model.patch_nums`, else the official ones of
    `data.image_size` (256 or 512, the official --pn)."""
    if config.model.patch_nums:
        return tuple(config.model.patch_nums)
    size = config.data.image_size
    if size not in PATCH_NUMS:
        raise ValueError(f'config.data.image_size {size} has no official patch_nums (those of '
                         f'{" or ".join(map(str, sorted(PATCH_NUMS)))}px): give config.model.patch_nums')
    return PATCH_NUMS[size]


# ---------------------------------------------------------------------------- the trainers' command line
def parse_flags(argv: list[str]) -> list[str]:
    """absl `app.run(main, flags_parser=config_lib.parse_flags)` for the trainers.

    Parses the flags and loads the config file now, so that the mistakes a user makes there (an
    unknown --config.field, a bad value, a missing config file, an unknown preset, an unknown
    flag) end as one `error:` line with exit code 2 (var_jax.utils.cli), before anything is created.
    Errors inside a config file other than ValueError / TypeError (its bugs) keep their traceback.
    """
    from absl import flags  # noqa: PLC0415

    f = flags.FLAGS
    try:
        rest = f(argv)
        config = f['config'].value
        config.get('seed')  # a config file that failed to load raises its error on first access
    except flags.Error as e:
        root = _root_cause(e)
        if root is not e and 'Error whilst parsing config file' in str(e):  # the config file's ValueError
            given = [a for a in argv if a.startswith('--config=')]
            _flag_error(f'{given[-1] if given else "--config"}: {root}')
        _flag_error(str(e))
    except OSError as e:  # ml_collections' deferred "Failed loading config file"
        path = getattr(f['config'], 'config_filename', '').split(':', 1)[0]
        if path and not os.path.isfile(path):
            _flag_error(f'config file {path} does not exist')
        _flag_error(str(_root_cause(e)))
    except (AttributeError, KeyError) as e:
        if not _from_override(e):
            raise
        _flag_error(_unknown_field(e, argv))
    if len(rest) > 1:
        _flag_error(f'unexpected arguments {rest[1:]} (flags are --name=value)')
    return rest


def _flag_error(msg: str):
    print('error: ' + ' '.join(msg.split()), file=sys.stderr)
    sys.exit(2)


def _root_cause(e: BaseException) -> BaseException:
    """The first exception of a chain: a config file's own ValueError reaches us wrapped twice (ml_collections
    adds its traceback to the text, absl the flag), and only its message is the user's."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _from_override(e: BaseException) -> bool:
    """Did the error come from resolving a --config.<path> override (not from the config file's code)?"""
    while e is not None:
        if any(fr.filename.endswith('config_path.py') and 'ml_collections' in fr.filename
               for fr in traceback.extract_tb(e.__traceback__)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _unknown_field(e: BaseException, argv: list[str]) -> str:
    """'--config.data.sorce: no such config field (did you mean "source" ...)' from ml_collections' error."""
    texts, x = [], e
    while x is not None:
        texts.append(str(x.args[0]) if x.args else str(x))
        x = x.__cause__ or x.__context__
    key = texts[-1].strip('"\'')
    paths = [a[2:].split('=', 1)[0] for a in argv if a.startswith('--config.')]
    named = [p for p in paths if p.rsplit('.', 1)[-1] == key] or paths
    hint = next((m.group(0) for t in texts if (m := re.search(r'Did you mean [^\n]*\?', t))), '')
    return f'{", ".join("--" + p for p in named)}: no such config field' + (f' ({hint})' if hint else '')


# ---------------------------------------------------------------------------- the workdir
def check_workdir(workdir) -> None:
    """ValueError when `workdir`, or the nearest of its parents that exists, is not a directory."""
    from etils import epath  # noqa: PLC0415

    p = epath.Path(workdir)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f'workdir {workdir}: {q} is a file, not a directory')
            return


@contextlib.contextmanager
def fresh_workdir_guard(workdir):
    """Remove `workdir` again when the run fails on a config or data error (ValueError,
    FileNotFoundError) before it wrote any training state, so a mistake leaves no half-made
    workdir (model.json, a tokenizer copy) that a corrected re-run would then resume from.

    Only a directory this run created is removed, and only while it holds no training state
    (no `metrics*.jsonl`, no saved checkpoint step): a workdir that existed before is never
    touched, whatever it holds.
    """
    from etils import epath  # noqa: PLC0415

    p = epath.Path(workdir)
    existed = p.exists()
    try:
        yield
    except (ValueError, FileNotFoundError):
        if not existed and p.is_dir() and not _holds_training_state(p) and _is_first_process():
            try:
                p.rmtree()
            except OSError:  # another process removed it first; nothing of the user's is at stake
                pass
        raise


def _holds_training_state(p, depth: int = 3) -> bool:
    """Metrics or a checkpoint step in `p` or its subfolders (the VAR workdir's `tokenizer/`)."""
    for c in p.iterdir():
        if c.name.startswith('metrics') and c.name.endswith('.jsonl'):
            return True
        if c.is_dir():
            if c.name == 'checkpoints' and any(c.iterdir()):
                return True
            if depth > 1 and _holds_training_state(c, depth - 1):
                return True
    return False


def _is_first_process() -> bool:
    if 'jax' not in sys.modules:
        return True
    import jax  # noqa: PLC0415

    return jax.process_index() == 0
