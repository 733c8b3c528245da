"""Multi-scale VQVAE (official `VQVAE`, `basic_vae.Encoder/Decoder`), NHWC.

image [-1, 1] (B, S, S, 3) --encoder, quant_conv--> f (B, S/16, S/16, Cvae)
    --quantize--> tokens per scale / f_hat --post_quant_conv, decoder--> image, clamped to [-1, 1]

Module and parameter names follow the official state dict (`encoder.down[2].block[0].nin_shortcut`,
`quantize.quant_resi[3]`, ...) so conversion is a rename plus a layout change (OIHW -> HWIO).
Convolutions compute in `cfg.dtype`; GroupNorm statistics and softmax stay float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models.config import VQVAEConfig, to_jnp_dtype
from var_jax.models.quantizer import MultiScaleQuantizer

# torch's default Conv2d init (kaiming-uniform, a=sqrt(5)); also much cheaper to compile than
# flax's truncated-normal default. Official weights replace it; tokenizer training starts from it.
_CONV_INIT = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _conv(cin, cout, k, cfg, rngs, stride=1, padding=None):
    pad = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else padding
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=to_jnp_dtype(cfg.dtype),
                    kernel_init=_CONV_INIT, rngs=rngs)


class GroupNorm(nnx.GroupNorm):
    """torch GroupNorm(32, C, eps=1e-6): two-pass variance, float32 statistics."""

    def __init__(self, c: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        super().__init__(c, num_groups=cfg.num_groups, epsilon=1e-6, use_fast_variance=False,
                         dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32))


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, cfg, rngs=rngs)
        self.conv1 = _conv(cin, cout, 3, cfg, rngs)
        self.norm2 = GroupNorm(cout, cfg, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, cfg, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions, 1x1 convs for qkv and output."""

    def __init__(self, c: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.norm = GroupNorm(c, cfg, rngs=rngs)
        self.qkv = _conv(c, 3 * c, 1, cfg, rngs)
        self.proj_out = _conv(c, c, 1, cfg, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum('bic,bjc->bij', q, k, preferred_element_type=jnp.float32) * c ** -0.5
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum('bij,bjc->bic', attn, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Zero-pad right/bottom by one, then 3x3 stride-2 conv without padding (official)."""

    def __init__(self, c: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, cfg, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, c: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, cfg, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution: res blocks (each followed by attention at the lowest resolution), resample."""

    def __init__(self, cin, cout, n_blocks, with_attn, resample, cfg, *, rngs):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs) for i in range(n_blocks)])
        self.attn = nnx.List([AttnBlock(cout, cfg, rngs=rngs) for _ in range(n_blocks)] if with_attn else [])
        self.downsample = Downsample(cout, cfg, rngs=rngs) if resample == 'down' else None
        self.upsample = Upsample(cout, cfg, rngs=rngs) if resample == 'up' else None

    def __call__(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, c: int, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(c, c, cfg, rngs=rngs)
        self.attn_1 = AttnBlock(c, cfg, rngs=rngs) if cfg.using_mid_sa else None
        self.block_2 = ResnetBlock(c, c, cfg, rngs=rngs)

    def __call__(self, x):
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        n = len(cfg.ch_mult)
        chans = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _conv(3, cfg.ch, 3, cfg, rngs)
        self.down = nnx.List([
            Level(chans[i], chans[i + 1], cfg.num_res_blocks, cfg.using_sa and i == n - 1,
                  'down' if i != n - 1 else None, cfg, rngs=rngs)
            for i in range(n)])
        self.mid = Mid(chans[-1], cfg, rngs=rngs)
        self.norm_out = GroupNorm(chans[-1], cfg, rngs=rngs)
        self.conv_out = _conv(chans[-1], cfg.z_channels, 3, cfg, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        n = len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, top, 3, cfg, rngs)
        self.mid = Mid(top, cfg, rngs=rngs)
        levels, cin = [], top
        for i in reversed(range(n)):  # built from the lowest resolution up, stored by level index
            cout = cfg.ch * cfg.ch_mult[i]
            levels.append(Level(cin, cout, cfg.num_res_blocks + 1, cfg.using_sa and i == n - 1,
                                'up' if i != 0 else None, cfg, rngs=rngs))
            cin = cout
        self.up = nnx.List(levels[::-1])
        self.norm_out = GroupNorm(cin, cfg, rngs=rngs)
        self.conv_out = _conv(cin, 3, 3, cfg, rngs)

    def features(self, z):
        """Everything before `conv_out` (the VQGAN adaptive loss weight differentiates that layer)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return nnx.silu(self.norm_out(h))

    def __call__(self, z):
        return self.conv_out(self.features(z))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class VQVAE(nnx.Module):
    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quantize = MultiScaleQuantizer(cfg, rngs=rngs)
        self.quant_conv = _conv(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, cfg, rngs)
        self.post_quant_conv = _conv(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, cfg, rngs)

    # ------------------------------------------------------------------ traceable pieces
    def encode(self, images: jax.Array) -> jax.Array:
        """images (B, S, S, 3) in [-1, 1] -> continuous latent f (B, s, s, Cvae), float32."""
        x = images.astype(to_jnp_dtype(self.config.dtype))
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def decode(self, f_hat: jax.Array, clamp: bool = True) -> jax.Array:
        """f_hat (B, s, s, Cvae) -> image (B, S, S, 3), float32, clamped to [-1, 1]."""
        x = self.decoder(self.post_quant_conv(f_hat.astype(to_jnp_dtype(self.config.dtype))))
        x = x.astype(jnp.float32)
        return jnp.clip(x, -1, 1) if clamp else x

    def __call__(self, images: jax.Array):
        """Training forward: (unclamped reconstruction, vq loss, quantizer aux)."""
        f_st, vq_loss, aux = self.quantize(self.encode(images))
        return self.decode(f_st, clamp=False), vq_loss, aux

    # ------------------------------------------------------------------ public API (validated)
    def check_images(self, images) -> jax.Array:
        images = jnp.asarray(images)
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f'images must be NHWC (B, {s}, {s}, 3) for this tokenizer, got {images.shape}')
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f'images must be floating point in [-1, 1], got dtype {images.dtype}')
        if _is_concrete(images):  # on the host: jnp ops here would be traced inside an outer jit
            host = np.asarray(images)
            lo, hi = float(host.min()), float(host.max())
            if not (lo >= -1.001 and hi <= 1.001):
                raise ValueError(f'images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]')
        return images

    def check_idx(self, idx_list) -> list[jax.Array]:
        pns = self.config.patch_nums
        if len(idx_list) != len(pns):
            raise ValueError(f'expected {len(pns)} token maps (one per scale), got {len(idx_list)}')
        out = []
        for si, (idx, pn) in enumerate(zip(idx_list, pns)):
            idx = jnp.asarray(idx)
            if idx.ndim != 2 or idx.shape[1] != pn * pn or not jnp.issubdtype(idx.dtype, jnp.integer):
                raise ValueError(f'scale {si}: tokens must be integer (B, {pn * pn}), got {idx.dtype} {idx.shape}')
            if _is_concrete(idx) and idx.size:
                host = np.asarray(idx)
                if host.min() < 0 or host.max() >= self.config.vocab_size:
                    raise ValueError(f'scale {si}: token ids must be in [0, {self.config.vocab_size}), '
                                     f'got [{int(host.min())}, {int(host.max())}]')
            out.append(idx.astype(jnp.int32))
        return out

    def img_to_idx(self, images) -> list[jax.Array]:
        """images NHWC float32 in [-1, 1] -> per-scale tokens [(B, pn*pn) int32], row-major."""
        return _img_to_idx(self, self.check_images(images))

    def idx_to_var_input(self, idx_list) -> jax.Array:
        """Per-scale tokens -> teacher-forcing input (B, L - pn_0^2, Cvae)."""
        return _idx_to_var_input(self, self.check_idx(idx_list))

    def idx_to_img(self, idx_list) -> jax.Array:
        """Per-scale tokens -> image NHWC in [-1, 1]."""
        return _idx_to_img(self, self.check_idx(idx_list))

    def img_to_fhat(self, images) -> jax.Array:
        return _img_to_fhat(self, self.check_images(images))


@nnx.jit
def _img_to_idx(model: VQVAE, images):
    return model.quantize.tokenize(model.encode(images))[0]


@nnx.jit
def _img_to_fhat(model: VQVAE, images):
    return model.quantize.tokenize(model.encode(images))[1]


@nnx.jit
def _idx_to_var_input(model: VQVAE, idx_list):
    return model.quantize.idx_to_var_input(idx_list)


@nnx.jit
def _idx_to_img(model: VQVAE, idx_list):
    return model.decode(model.quantize.idx_to_fhat(idx_list))
