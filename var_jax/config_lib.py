"""Training configs (ml_collections) for both trainers, and their validation.

`configs/*.py` are one-liners over these builders, so each recipe reads like the official table:
    d16  bs 768  ep 200  tblr 1e-4  alng 1e-3  wpe 0.1
    d20  bs 768  ep 250  tblr 1e-4  alng 1e-3  wpe 0.1
    d24  bs 768  ep 350  tblr 8e-5  alng 1e-4  wpe 0.01
    d30  bs 1024 ep 350  tblr 8e-5  alng 1e-5  wpe 0.01  twde 0.08
    d36  bs 768  ep 350  tblr 8e-5  alng 5e-6  wpe 0.01  twde 0.08  saln, 512px
Peak lr = tblr * batch_size / 256; warm-up ep/50 epochs from 0.5 %; `lin0` decay; AdamW
(0.9, 0.95), wd 0.05 -> twde (cosine); grad clip 2; bf16 compute with float32 parameters.
`arg` (the text after ':' in --config=configs/d16.py:runlocal) selects variants: `runlocal`
shrinks the batch and steps for a smoke test on one machine.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from var_jax.models import PATCH_NUMS

DATA_SOURCES = ('builtin', 'imagefolder', 'tfds', 'tokens')  # tokens: VAR only (python -m var_jax.pretokenize)


def _parse_arg(arg: str | None) -> dict[str, str]:
    out = {}
    for part in (arg or '').split(','):
        if part:
            k, _, v = part.partition('=')
            out[k] = v or 'True'
    return out


def data_config(*, source='tfds', image_size=256, hflip=False, workers=8, **kw) -> ConfigDict:
    c = ConfigDict(dict(source=source, image_size=image_size, hflip=hflip, workers=workers,
                        name='imagenet2012', data_dir='', train_split='train', eval_split='validation',
                        path='', eval_path=''))
    c.update(kw)
    return c


def common(c: ConfigDict, *, batch_size: int, epochs: float) -> ConfigDict:
    c.seed = 0
    c.batch_size = batch_size
    c.epochs = epochs
    c.total_steps = 0  # > 0 overrides epochs
    c.grad_accum = 1
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))  # num_devices 0 = all
    c.log_every = 50
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    c.eval_every = 0
    c.max_nonfinite = 20
    return c


def var_recipe(*, depth: int, batch_size: int, epochs: float, tblr: float, alng: float, wpe: float,
               twde: float = 0.05, pn: int = 256, arg: str | None = None) -> ConfigDict:
    """The official VAR-d{depth} recipe on ImageNet (TFDS); see the table above."""
    c = common(ConfigDict(), batch_size=batch_size, epochs=epochs)
    c.model = ConfigDict(dict(depth=depth, width=0, num_heads=0, shared_aln=depth == 36, pn=pn, patch_nums=(),
                              num_classes=0, dtype='bfloat16', attention='xla', remat='none', scan_layers=True,
                              cond_drop_rate=0.1, drop_path_rate=-1.0, aln=0.5, alng=alng))
    # the frozen tokenizer: a converted official checkpoint, a tokenizer workdir, or '' to train one
    # first with `tokenizer_train` (only sensible for small data such as the built-in set)
    c.tokenizer = ConfigDict(dict(checkpoint='', train=ConfigDict()))
    c.init_from = ''  # converted official VAR checkpoint to fine-tune from
    c.data = data_config(image_size=pn)
    # ema: decay of an EMA copy of the VAR weights; 0 (off) is the official recipe. When on, sample
    # grids, the built-in score and exported weights use the EMA copy.
    c.optim = ConfigDict(dict(tblr=tblr, lr=0.0, wd=0.05, wd_end=twde, wp_epochs=epochs / 50, wp0=0.005, wpe=wpe,
                              sched='lin0', clip=2.0, b1=0.9, b2=0.95, label_smooth=0.0, ema=0.0))
    c.sample = ConfigDict(dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4, cfg=4.0, top_k=900,
                               top_p=0.95, seed=0, more_smooth=False))
    c.evaluate = False  # after training: the built-in classifier scores (built-in data only)
    opts = _parse_arg(arg)
    if 'runlocal' in opts:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 20, 5, 10
        c.data.workers = 0
    return c


def tokenizer_recipe(*, arg: str | None = None) -> ConfigDict:
    """Official-architecture multi-scale VQVAE (ch 160, V 4096, Cvae 32, 256px) on ImageNet."""
    c = common(ConfigDict(), batch_size=256, epochs=100)
    c.model = ConfigDict(dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                              using_sa=True, using_mid_sa=True, num_groups=32, beta=0.25, using_znorm=False,
                              quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, pn=256, patch_nums=(),
                              dtype='float32'))
    c.init_from = ''  # a converted official VQVAE (fine-tuning, e.g. on a new domain)
    c.data = data_config(image_size=256, hflip=True)
    c.optim = ConfigDict(dict(lr=1e-4, wd=0.0, wd_end=0.0, b1=0.5, b2=0.9, clip=0.0, warmup_steps=1000,
                              sched='const', disc_lr=1e-4))
    c.loss = ConfigDict(dict(l1=1.0, l2=0.0, vq=1.0, lpips=1.0, lpips_weights='', gan=0.5, gan_start=20_000,
                             disc_ch=64, disc_layers=3, adaptive_weight=True, ema=0.0))
    c.codebook = ConfigDict(dict(reseed=True, reseed_every=200, dead_threshold=0.03, usage_decay=0.99))
    c.eval_batches = 8  # held-out batches for PSNR / LPIPS / usage
    opts = _parse_arg(arg)
    if 'runlocal' in opts:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 4, 10, 5, 10
        c.data.workers = 0
    return c


def tokenizer_tiny(arg: str | None = None) -> ConfigDict:
    """A small tokenizer for 32px built-in images: 4x downsampling, 8x8 latent, six scales.

    Sized for a 2-core CPU (about 3 minutes): 16 base channels (GroupNorm with 8 groups), no
    attention, batch 16 for 1200 steps at lr 5e-3; plain MSE + VQ loss (no LPIPS / GAN). V = 128:
    reconstructions as good as with 512 codes, and a VAR learns the smaller vocabulary faster.
    Measured: ~20 dB held-out PSNR (docs/builtin_default.md).
    """
    c = tokenizer_recipe(arg=arg)
    c.model.update(vocab_size=128, z_channels=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8,
                   using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 3, 4, 6, 8))
    c.data = data_config(source='builtin', image_size=32, workers=0)
    c.batch_size, c.epochs, c.total_steps = 16, 0, 1200
    c.optim.update(lr=5e-3, warmup_steps=20, sched='cos', b1=0.9, b2=0.99)
    c.loss.update(lpips=0.0, gan=0.0, l2=1.0, l1=0.0)
    c.codebook.update(reseed_every=50)
    c.log_every, c.checkpoint_every, c.eval_batches = 100, 400, 4
    if 'runlocal' in _parse_arg(arg):
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
    m = config.model
    if not m.patch_nums:
        need(m.pn in PATCH_NUMS, f'model.pn must be one of {sorted(PATCH_NUMS)} (or give model.patch_nums), got {m.pn}')
    if kind == 'var':
        o = config.optim
        need(o.tblr > 0 or o.lr > 0, 'optim.tblr (or optim.lr) must be > 0')
        need(0 <= o.label_smooth < 1, f'optim.label_smooth must be in [0, 1), got {o.label_smooth}')
        need(0 <= o.get('ema', 0.0) < 1, f'optim.ema must be in [0, 1) (0 = off), got {o.get("ema")}')
        need(o.sched in ('lin0', 'cos', 'const'), f"optim.sched must be 'lin0', 'cos' or 'const', got {o.sched!r}")
        need(m.depth >= 1, f'model.depth must be >= 1, got {m.depth}')
        need(m.dtype in ('float32', 'bfloat16', 'float16'), f'model.dtype {m.dtype!r} is not a float dtype')


def patch_nums_of(model_cfg) -> tuple[int, ...]:
    return tuple(model_cfg.patch_nums) if model_cfg.patch_nums else PATCH_NUMS[model_cfg.pn]
