"""Model configurations (VQVAE tokenizer and VAR transformer) and the official presets.

Configs are frozen dataclasses of plain Python values so that they serialise to JSON next to
every checkpoint (`to_dict` / `from_dict`); the model is rebuilt from that file alone.
Invalid values raise `ValueError` with a sentence naming the field.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # L = 2240
PATCH_NUMS = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512}
PATCH_NUMS_8 = (1, 2, 3, 4, 6, 8)  # L = 130: the built-in default's 8x8 latent (configs/tiny.py)
# image size -> the tokenizer's downsampling factor for own-data runs (configs/folder.py): small images keep
# an 8x8 latent (a VAR of 130 tokens trains on a CPU), 128 px a 16x16 one, 256 / 512 px the official 16x
DOWNSAMPLE_FOR = {32: 4, 64: 8, 128: 8, 256: 16, 512: 16}


def downsample_for(image_size: int) -> int:
    """The tokenizer's downsampling for `image_size`: the preset above, else 16 from 256 px up, 8 from
    64 px up and 4 below (the latent side image_size / downsample must be a whole number)."""
    if image_size in DOWNSAMPLE_FOR:
        return DOWNSAMPLE_FOR[image_size]
    return 16 if image_size >= 256 else 8 if image_size >= 64 else 4


def patch_nums_for(image_size: int) -> tuple[int, ...]:
    """The scale list (token-map sides, coarse to fine) for `image_size` px images.

    Presets: 32 and 64 px -> (1, 2, 3, 4, 6, 8) (8x8 latent); 128 and 256 px -> PATCH_NUMS_256
    (16x16 latent, the official list); 512 px -> PATCH_NUMS_512. Other sizes: latent side
    n = image_size / downsample_for(image_size), and the official 16-side list scaled by n / 16,
    rounded, repeats dropped, from 1 up to n (e.g. 96 px -> n = 12 -> (1, 2, 3, 4, 6, 8, 10, 12)).
    This is what FoundationVision/VAR users ask for as "the scales for another resolution": the
    first scales stay 1, 2, 3, 4 (the class-level layout), the last is the full latent.
    """
    ds = downsample_for(image_size)
    if image_size < 8 or image_size % ds:
        raise ValueError(f'image size {image_size} px: need a multiple of {ds} (the tokenizer downsamples '
                         f'{ds}x), e.g. 32, 64, 128 or 256')
    n = image_size // ds
    presets = {8: PATCH_NUMS_8, 16: PATCH_NUMS_256, 32: PATCH_NUMS_512}
    if n in presets:
        return presets[n]
    scaled = [max(1, round(p * n / 16)) for p in PATCH_NUMS_256[:-1]] + [n]
    return tuple(sorted({1, *scaled}))

ATTENTION = ('xla', 'jax', 'blockwise', 'cudnn', 'splash')  # models.var.attend

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def to_jnp_dtype(name: str):
    if name not in _DTYPES:
        raise ValueError(f'unknown dtype {name!r}; expected one of {sorted(_DTYPES)}')
    return _DTYPES[name]


def _check_patch_nums(patch_nums: tuple[int, ...], owner: str) -> None:
    if len(patch_nums) < 1 or any(not isinstance(p, int) or p < 1 for p in patch_nums):
        raise ValueError(f'{owner}.patch_nums must be positive integers, got {patch_nums}')
    if any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f'{owner}.patch_nums must be strictly increasing, got {patch_nums}')


class _Config:
    """Shared (de)serialisation for the frozen model configs."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f'{cls.__name__}: unknown field(s) {unknown}')
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(_Config):
    """Multi-scale residual VQVAE; defaults are the official `vae_ch160v4096z32`."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True  # attention in the lowest-resolution level
    using_mid_sa: bool = True
    num_groups: int = 32  # GroupNorm groups (official: 32)
    beta: float = 0.25  # commitment weight of the VQ loss
    using_znorm: bool = False  # cosine-similarity lookup instead of Euclidean
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # Phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4  # 0: one Phi per scale, 1: one shared Phi, K: K partially shared
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    dtype: str = 'float32'  # compute dtype of the convolutions (parameters stay float32)

    def __post_init__(self):
        _check_patch_nums(self.patch_nums, 'VQVAEConfig')
        for name in ('vocab_size', 'z_channels', 'ch', 'num_res_blocks', 'num_groups'):
            if getattr(self, name) < 1:
                raise ValueError(f'VQVAEConfig.{name} must be >= 1, got {getattr(self, name)}')
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f'VQVAEConfig.ch_mult must be positive integers, got {self.ch_mult}')
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise ValueError(
                    f'VQVAEConfig: channel count ch*ch_mult = {self.ch * m} is not divisible by '
                    f'num_groups={self.num_groups} (GroupNorm)')
        if self.quant_conv_ks % 2 != 1:
            raise ValueError(f'VQVAEConfig.quant_conv_ks must be odd, got {self.quant_conv_ks}')
        if self.share_quant_resi < 0:
            raise ValueError(f'VQVAEConfig.share_quant_resi must be >= 0, got {self.share_quant_resi}')
        to_jnp_dtype(self.dtype)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)


@dataclasses.dataclass(frozen=True)
class VARConfig(_Config):
    """VAR transformer; `var_config(depth)` gives the official d16..d36 models."""

    depth: int = 16
    width: int = 0  # 0: 64 * depth (official)
    num_heads: int = 0  # 0: depth (official; head dim 64)
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class `num_classes` is the null class used for guidance
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1  # label dropout for guidance, applied in training only
    drop_path_rate: float = -1.0  # < 0: 0.1 * depth / 24 (official)
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0  # < 0: sqrt(1 / (3 C))
    dtype: str = 'float32'  # compute dtype; softmax, norms, logits and CE stay float32
    # 'xla': einsum softmax over the full (L, L) mask; 'jax': jax.nn.dot_product_attention, full mask;
    # 'blockwise': per group of scales against its key prefix only (skips the masked logits);
    # 'cudnn': cuDNN fused attention (GPU, bf16/fp16); 'splash': Pallas splash attention (TPU).
    # All give the same result (models.var.attend; check_attention compares one with 'xla').
    attention: str = 'xla'
    remat: str = 'none'  # 'none' | 'block' (recompute each block in the backward pass) | 'dots'
    scan_layers: bool = True  # False: unroll the layer loop (faster for shallow models, slower to compile)

    def __post_init__(self):
        _check_patch_nums(self.patch_nums, 'VARConfig')
        for name in ('depth', 'num_classes', 'vocab_size', 'cvae'):
            if getattr(self, name) < 1:
                raise ValueError(f'VARConfig.{name} must be >= 1, got {getattr(self, name)}')
        if self.width < 0 or self.num_heads < 0:
            raise ValueError('VARConfig.width and num_heads must be >= 0 (0 = official default)')
        if self.C % self.H:
            raise ValueError(f'VARConfig: width {self.C} is not divisible by num_heads {self.H}')
        if not 0.0 <= self.cond_drop_rate < 1.0:
            raise ValueError(f'VARConfig.cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}')
        if self.attention not in ATTENTION:
            raise ValueError(f'VARConfig.attention must be one of {ATTENTION}, got {self.attention!r}')
        if self.attention == 'cudnn' and self.dtype == 'float32':
            raise ValueError("VARConfig.attention='cudnn' needs dtype 'bfloat16' or 'float16' (cuDNN fused "
                             "attention has no float32 kernel)")
        if self.remat not in ('none', 'block', 'dots'):
            raise ValueError(f"VARConfig.remat must be 'none', 'block' or 'dots', got {self.remat!r}")
        to_jnp_dtype(self.dtype)

    @property
    def C(self) -> int:
        return self.width or 64 * self.depth

    @property
    def H(self) -> int:
        return self.num_heads or self.depth

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def dpr(self) -> float:
        return 0.1 * self.depth / 24 if self.drop_path_rate < 0 else self.drop_path_rate

    @property
    def std(self) -> float:
        return math.sqrt(1 / (3 * self.C)) if self.init_std < 0 else self.init_std


# Official recipes (README): depth -> (alng); shared AdaLN and the 512 scale set only for d36.
OFFICIAL_DEPTHS = (16, 20, 24, 30, 36)


def var_config(depth: int, **overrides) -> VARConfig:
    """The official VAR-d{depth}: width 64*depth, heads = depth, dpr 0.1*depth/24.

    d36 is the released 512px model with shared AdaLN, as in the official demo.
    """
    kw: dict[str, Any] = dict(depth=depth)
    if depth == 36:
        kw.update(shared_aln=True, patch_nums=PATCH_NUMS_512)
    kw.update(overrides)
    return VARConfig(**kw)


def vqvae_config(**overrides) -> VQVAEConfig:
    """The official `vae_ch160v4096z32` (the same weights serve 256 and 512 px)."""
    return VQVAEConfig(**overrides)


def check_pair(vq: VQVAEConfig, var: VARConfig) -> None:
    """The transformer must read the tokenizer's tokens."""
    if tuple(vq.patch_nums) != tuple(var.patch_nums):
        raise ValueError(f'patch_nums differ: tokenizer {vq.patch_nums}, VAR {var.patch_nums}')
    if vq.vocab_size != var.vocab_size:
        raise ValueError(f'vocab_size differs: tokenizer {vq.vocab_size}, VAR {var.vocab_size}')
    if vq.z_channels != var.cvae:
        raise ValueError(f'latent channels differ: tokenizer {vq.z_channels}, VAR cvae {var.cvae}')
