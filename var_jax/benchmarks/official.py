"""The official PyTorch code (FoundationVision/VAR) as the other side of `compare`.

Imported at run time from the user's own checkout: DIR goes on `sys.path` and its `models`
package (`build_vae_var`, `VAR`, `VQVAE`) and `utils.amp_sc.AmpOptimizer` are imported from
there; nothing of it is copied into var_jax. Each workload runs what the official code runs:

- `train`: `VAR.forward` in train mode (label dropout, drop path) on random
  `x_BLCv_wo_first_l`, labels and targets; cross-entropy (reduction none) x 1/L, summed, mean
  over the batch; `AmpOptimizer.backward_clip_step`: backward, `clip_grad_norm_(2.0)`, AdamW
  (0.9, 0.95) step, `zero_grad`. var_jax: the `var_jax.train` step fed random teacher-forcing
  input and targets (`benchmarks.train.train_step_program(var_alone=True)`).
- `train_encode`: the same after `vae.img_to_idxBl` + `quantize.idxBl_to_var_input` of random
  images, outside autocast, as `VARTrainer.train_step`. var_jax: the `var_jax.train` step
  (it encodes in the step).
- `train_tokens`: the official side runs `train_encode` (it has no pre-tokenized path: this is
  the step its users run); var_jax: the step of pre-tokenized training (`data.source='tokens'`:
  token batches, teacher-forcing input from the indices, no encoder).
- `sample`: `VAR.autoregressive_infer_cfg(B, labels, g_seed, cfg, top_k, top_p)` in eval mode
  under `inference_mode`, decode included. var_jax: `sampling.sample` (decode included).
- `encode`: `vae.img_to_idxBl`. var_jax: `quantize.tokenize(encode(images))`.
- `decode`: `vae.fhat_to_img`. var_jax: `vqvae.decode`.

Settings mirror the defaults of the official `train.py` / `utils/arg_util.py`: eager (tfast =
vfast = 0, no `torch.compile`); float32, or with `--dtype bfloat16` autocast to bf16 around the
forward (fp16=2; `torch.autocast('cpu', ...)` on CPU); TF32 matmuls and convolutions on CUDA
(tf32=True); fused AdamW (afuse=True; plain AdamW where this torch has no fused kernel for the
device); flash-attn / xformers / fused MLP when installed (fuse=True), else torch SDPA; weight
decay 0.05 on the weights that `utils.lr_control.filter_params` decays (not 1-D, not a bias, none
of the official no-decay names), 0 elsewhere (`filter_params` itself calls the official
logger's print and needs its distributed setup, so the grouping rule is applied here).
`VARTrainer.train_step` cannot be imported (trainer.py pulls in `pytz` and `tap` through
`utils.misc`); its forward/loss lines are the ones written out in `_train_step` below.

Random weights: `build_vae_var` builds VARs of the official shape (width 64 x depth, heads =
depth, drop path 0.1 x depth / 24), `VAR(...)` itself any other width. `build_vae_var` switches
off torch's own initialisation for good (the official code loads a checkpoint next): this module
puts `reset_parameters` back afterwards and fills the VQVAE with random values itself (the
values do not change the speed, but uninitialised memory may hold NaNs or denormals, which do).
The official VQVAE has a fixed layout (ch_mult 1,1,2,2,4, two res blocks, attention, 32 groups):
tokenizer workloads of a var_jax tokenizer with another layout are reported as not comparable.
`models/var.py` imports `huggingface_hub` only for its hub mixin class; when that package is
missing a stand-in class is registered so the checkout imports.
"""
# ruff: noqa: N806  (local names follow the official code's shape suffixes: gt_BL, logits_BLV, L, V)
from __future__ import annotations

import contextlib
import gc
import importlib
import io
import pathlib
import sys
import types

# names the official train.py excludes from weight decay (utils/lr_control.filter_params nowd_keys)
NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
             'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')
WEIGHT_DECAY, GRAD_CLIP, BETAS, TBLR = 0.05, 2.0, (0.9, 0.95), 1e-4


class NotComparable(Exception):  # noqa: N818  (a verdict on a workload, not an error)
    """This workload cannot run the same model on both sides (the table says why)."""


def import_official(path: str):
    """-> (torch, the official `models` package, `utils.amp_sc`) of the checkout at `path`.

    ValueError (one `error:` line) for a missing directory, one without `models/`, no torch."""
    d = pathlib.Path(path).expanduser()
    if not d.is_dir():
        raise ValueError(f'--official: no such directory: {path}')
    if not (d / 'models' / '__init__.py').is_file() or not (d / 'models' / 'var.py').is_file():
        raise ValueError(f'--official {path}: no models/ package of FoundationVision/VAR there (models/var.py)')
    try:
        import torch  # noqa: PLC0415  (optional: only `bench compare` needs torch)
    except ImportError:
        raise ValueError('compare needs PyTorch to run the official code: pip install torch') from None
    root = d.resolve()
    for name in ('models', 'dist', 'utils'):  # top-level names of the checkout
        m = sys.modules.get(name)
        if m is None:
            continue
        where = [getattr(m, '__file__', None) or '', *getattr(m, '__path__', ())]  # utils/ is a namespace package
        if not any(w and pathlib.Path(w).resolve().is_relative_to(root) for w in where):
            raise ValueError(f'a module named {name!r} from elsewhere ({where[0] or m}) is already imported; '
                             f'cannot import the official one from {path}')
    try:
        importlib.import_module('huggingface_hub')
    except ImportError:  # used by models/var.py only for the VARHF hub mixin
        stub = types.ModuleType('huggingface_hub')
        stub.PyTorchModelHubMixin = type('PyTorchModelHubMixin', (), {})
        sys.modules['huggingface_hub'] = stub
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            models = importlib.import_module('models')
            amp_sc = importlib.import_module('utils.amp_sc')
    except Exception as e:  # noqa: BLE001 - the user's environment: say what is missing, in one line
        raise ValueError(f'could not import the official code from {path}: {type(e).__name__}: {e}') from None
    for attr in ('build_vae_var', 'VAR', 'VQVAE'):
        if not hasattr(models, attr):
            raise ValueError(f'--official {path}: models has no {attr} (not a FoundationVision/VAR checkout?)')
    return torch, models, amp_sc


def official_tokenizer_layout(vq) -> bool:
    """Can the official VQVAE class build this var_jax VQVAEConfig? (its layout is hard-coded)"""
    return (tuple(vq.ch_mult) == (1, 1, 2, 2, 4) and vq.num_res_blocks == 2 and vq.using_sa and vq.using_mid_sa
            and vq.num_groups == 32)


def _checkout_commit(path: pathlib.Path) -> str:
    head = path / '.git' / 'HEAD'
    try:
        ref = head.read_text().strip()
        if ref.startswith('ref: '):
            ref = (path / '.git' / ref[5:]).read_text().strip()
        return ref[:7]
    except OSError:
        return 'unknown commit'


class OfficialSide:
    """The official code's models on `device` ('cpu' or 'cuda'), one timed callable per workload."""

    name = 'official'

    def __init__(self, path: str, spec, device: str, threads: int | None):
        self.torch, self.models, self.amp_sc = import_official(path)
        torch = self.torch
        self.path, self.spec, self.dev = path, spec, torch.device(device)
        self._threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        if self.dev.type == 'cuda':  # official tf32=True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.vae, self.var = self._build()
        self._held = None
        bv = sys.modules.get('models.basic_var')
        self.attention = ('flash-attn' if getattr(bv, 'flash_attn_func', None) else
                          'xformers' if getattr(bv, 'memory_efficient_attention', None) else 'torch SDPA')
        self.fused_adamw = None  # known after the first train workload

    # ------------------------------------------------------------------ models
    def _build(self):
        torch, nn, m = self.torch, self.torch.nn, self.models
        vq, c = self.spec.vq, self.spec.var
        self.tokenizer_ok = official_tokenizer_layout(vq)
        # the VAR only needs the quantizer of a VQVAE to be built; a placeholder stands in for a
        # tokenizer layout the official class cannot build (tokenizer workloads are then n/a)
        ch = vq.ch if self.tokenizer_ok else 32
        classes = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                   nn.ConvTranspose1d, nn.ConvTranspose2d)
        saved = {k: k.__dict__['reset_parameters'] for k in classes if 'reset_parameters' in k.__dict__}
        official_shape = (c.C == 64 * c.depth and c.H == c.depth and abs(c.dpr - 0.1 * c.depth / 24) < 1e-12
                          and c.mlp_ratio == 4.0 and c.norm_eps == 1e-6 and c.cond_drop_rate == 0.1)
        self.builder = 'build_vae_var' if official_shape else 'VAR(...)'
        try:
            with contextlib.redirect_stdout(sys.stderr):  # init_weights prints
                if official_shape:
                    vae, var = m.build_vae_var(
                        device=self.dev, patch_nums=tuple(c.patch_nums), V=vq.vocab_size, Cvae=vq.z_channels, ch=ch,
                        share_quant_resi=vq.share_quant_resi, num_classes=c.num_classes, depth=c.depth,
                        shared_aln=c.shared_aln, attn_l2_norm=c.attn_l2_norm, init_adaln=c.init_adaln,
                        init_adaln_gamma=c.init_adaln_gamma, init_head=c.init_head, init_std=c.init_std)
                else:
                    vae = m.VQVAE(vocab_size=vq.vocab_size, z_channels=vq.z_channels, ch=ch, test_mode=True,
                                  share_quant_resi=vq.share_quant_resi, v_patch_nums=tuple(c.patch_nums)).to(self.dev)
                    var = m.VAR(vae_local=vae, num_classes=c.num_classes, depth=c.depth, embed_dim=c.C,
                                num_heads=c.H, mlp_ratio=c.mlp_ratio, drop_rate=0., attn_drop_rate=0.,
                                drop_path_rate=c.dpr, norm_eps=c.norm_eps, shared_aln=c.shared_aln,
                                cond_drop_rate=c.cond_drop_rate, attn_l2_norm=c.attn_l2_norm,
                                patch_nums=tuple(c.patch_nums)).to(self.dev)
                    var.init_weights(init_adaln=c.init_adaln, init_adaln_gamma=c.init_adaln_gamma,
                                     init_head=c.init_head, init_std=c.init_std)
        finally:
            for k, f in saved.items():
                k.reset_parameters = f
        with torch.no_grad():  # random tokenizer weights (build_vae_var leaves them uninitialised)
            g = torch.Generator(device='cpu').manual_seed(0)
            for name, p in vae.named_parameters():
                if p.ndim == 1:
                    p.fill_(1.0 if name.endswith('weight') else 0.0)  # norm scales, biases
                else:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).clamp_(-0.04, 0.04))
        return vae, var

    def _autocast(self):
        if self.spec.var.dtype == 'bfloat16':
            return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self):
        if self.dev.type == 'cuda':
            self.torch.cuda.synchronize()

    def _need_tokenizer(self):
        if not self.tokenizer_ok:
            vq = self.spec.vq
            raise NotComparable(f'the official VQVAE has a fixed layout (ch_mult 1,1,2,2,4, 2 res blocks, attention); '
                                f'this tokenizer is ch_mult {",".join(map(str, vq.ch_mult))}, '
                                f'{vq.num_res_blocks} res blocks')

    def _rand(self, *shape):
        g = self.torch.Generator(device='cpu').manual_seed(1)
        return self.torch.rand(shape, generator=g).to(self.dev)

    # ------------------------------------------------------------------ workloads
    def prepare(self, workload: str):
        torch, s, c = self.torch, self.spec, self.spec.var
        b, size = s.batch, s.vq.image_size
        if workload in ('train', 'train_encode', 'train_tokens'):
            encode = workload != 'train'  # train_tokens: the official on-the-fly step (no pre-tokenized path)
            if encode:
                self._need_tokenizer()
            return self._train_step(encode=encode)
        if workload == 'sample':
            self._need_tokenizer()
            self.var.eval()
            labels = torch.arange(b, device=self.dev) % c.num_classes

            def sample():
                with torch.inference_mode(), self._autocast():
                    self.var.autoregressive_infer_cfg(B=b, label_B=labels, g_seed=s.seed, cfg=s.cfg, top_k=s.top_k,
                                                      top_p=s.top_p, more_smooth=False)
                self._sync()
            return sample
        if workload == 'encode':
            self._need_tokenizer()
            images = self._rand(b, 3, size, size) * 2 - 1

            def encode():
                with torch.no_grad(), self._autocast():
                    self.vae.img_to_idxBl(images)
                self._sync()
            return encode
        if workload == 'decode':
            self._need_tokenizer()
            pn = c.patch_nums[-1]
            f_hat = self._rand(b, s.vq.z_channels, pn, pn) * 2 - 1

            def decode():
                with torch.no_grad(), self._autocast():
                    self.vae.fhat_to_img(f_hat)
                self._sync()
            return decode
        raise ValueError(f'unknown workload {workload!r}')

    def _train_step(self, encode: bool):
        torch, s, c = self.torch, self.spec, self.spec.var
        b, L, V = s.batch, c.L, c.vocab_size
        var, vae = self.var, self.vae
        var.train()
        decay, no_decay = [], []
        for name, p in var.named_parameters():
            (no_decay if p.ndim == 1 or name.endswith('bias') or any(k in name for k in NOWD_KEYS) else decay).append(p)
        groups = [{'params': decay, 'weight_decay': WEIGHT_DECAY}, {'params': no_decay, 'weight_decay': 0.0}]
        try:
            opt = torch.optim.AdamW(groups, lr=TBLR * b / 256, betas=BETAS, fused=True)
            self.fused_adamw = True
        except (RuntimeError, TypeError):  # no fused kernel for this device in this torch
            opt = torch.optim.AdamW(groups, lr=TBLR * b / 256, betas=BETAS)
            self.fused_adamw = False
        mp = 2 if c.dtype == 'bfloat16' and self.dev.type == 'cuda' else 0  # AmpOptimizer's autocast is CUDA's
        amp_opt = self.amp_sc.AmpOptimizer(mixed_precision=mp, optimizer=opt, names=[], paras=decay + no_decay,
                                           grad_clip=GRAD_CLIP)
        ce = torch.nn.CrossEntropyLoss(label_smoothing=float(s.config.optim.label_smooth), reduction='none')
        loss_weight = torch.ones(1, L, device=self.dev) / L
        g = torch.Generator(device='cpu').manual_seed(2)
        labels = torch.randint(0, c.num_classes, (b,), generator=g).to(self.dev)
        if encode:
            images = self._rand(b, 3, s.vq.image_size, s.vq.image_size) * 2 - 1
        else:
            x_in = torch.randn(b, L - c.patch_nums[0] ** 2, c.cvae, generator=g).to(self.dev)
            target = torch.randint(0, V, (b, L), generator=g).to(self.dev)
        self._held = (opt, amp_opt)

        def step():
            if encode:  # VARTrainer.train_step: tokens of the batch, outside autocast
                gt_idx_Bl = vae.img_to_idxBl(images)
                gt_BL = torch.cat(gt_idx_Bl, dim=1)
                x_BLCv_wo_first_l = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
            else:
                gt_BL, x_BLCv_wo_first_l = target, x_in
            with self._autocast():
                logits_BLV = var(labels, x_BLCv_wo_first_l)
                loss = ce(logits_BLV.view(-1, V), gt_BL.view(-1)).view(b, -1)
                loss = loss.mul(loss_weight).sum(dim=-1).mean()
            amp_opt.backward_clip_step(loss=loss, stepping=True)
            logits_BLV.data.argmax(dim=-1)  # pred_BL, computed every step by the official trainer
            self._sync()
        return step

    def release(self):
        self._held = None
        gc.collect()
        if self.dev.type == 'cuda':
            self.torch.cuda.empty_cache()

    def close(self):
        self.release()
        self.torch.set_num_threads(self._threads)

    def describe(self) -> str:
        torch = self.torch
        where = (torch.cuda.get_device_name(self.dev) if self.dev.type == 'cuda'
                 else f'cpu, {torch.get_num_threads()} threads')
        fused = {None: '', True: ', fused AdamW', False: ', AdamW (no fused kernel here)'}[self.fused_adamw]
        return (f'official code at {pathlib.Path(self.path).resolve()} ({_checkout_commit(pathlib.Path(self.path))}); '
                f'torch {torch.__version__} ({where}); eager; attention {self.attention}{fused}; built by '
                f'{self.builder}')

    def info(self) -> dict:
        return {'path': str(pathlib.Path(self.path).resolve()), 'torch': self.torch.__version__,
                'device': str(self.dev), 'attention': self.attention, 'fused_adamw': self.fused_adamw,
                'builder': self.builder, 'threads': self.torch.get_num_threads()}
