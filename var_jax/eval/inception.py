"""InceptionV3 for FID (the 2015 TF graph ADM evaluates with), NHWC, float32.

The ADM suite runs TF's frozen `classify_image_graph_def.pb` (inception-2015-12-05). pytorch-fid
ported that graph's weights to torchvision's layout (`pt_inception-2015-12-05-6726825d.pth`) and
patched the blocks where the graph differs from torchvision's InceptionV3 (`FIDInceptionA/C/E_1/
E_2`): TF's average pools ignore the zero padding (count_include_pad=False), and the last block
max-pools its pool branch. Module and parameter names follow that state dict (`Mixed_6d.
branch1x1.conv`, `...bn`), so loading is a rename plus a layout change (OIHW -> HWIO, Linear W.T).

Outputs (names of the TF graph in brackets):
  pool     (B, 2048)  global average pool after Mixed_7c            [pool_3:0]      FID, IS, P/R
  spatial  (B, 2023)  Mixed_6d.branch1x1 (1x1 conv, BN, ReLU; 17x17x192), first 7 channels,
                      flattened in (h, w, c) order as ADM reshapes its NHWC tensor
                                                                    [mixed_6/conv:0] sFID
           TF's mixed, mixed_1..mixed_10 are torchvision's Mixed_5b..5d, 6a..6e, 7a..7c, so
           mixed_6 is Mixed_6d, and each mixed block's first `conv` scope is its 1x1 branch.
  logits   (B, 1008)  pool @ fc.weight.T, no bias: ADM's IS takes only the `softmax/logits/
                      MatMul` weight of the graph and softmaxes over all 1008 outputs (the
                      1000 classes plus TF's background and 7 unused slots)  [softmax/logits/MatMul]

Preprocessing (`preprocess`): ADM feeds float [0, 255] NHWC images into the graph at
`ExpandDims:0`; the graph then resizes to 299x299 with TF1's `ResizeBilinear` (align_corners=False,
no half-pixel centres: source = dst * in/out, no antialiasing) and maps x -> (x - 128) / 128.
We do the same ops, as separable (299, in) matrices. pytorch-fid instead uses torch's half-pixel
bilinear resize and 2x/255 - 1, which shifts the image by half a pixel and scales it by 128/127.5.

Convolutions run at `Precision.HIGHEST`: on GPUs/TPUs the default f32 precision uses TF32/bf16
passes, which would move features by ~1e-3 relative.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.eval.inputs import check_inception_path
from var_jax.io.state_dict import load_state_dict

INPUT_SIZE = 299
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
BN_EPS = 1e-3         # torchvision BasicConv2d (the TF graph's batchnorm epsilon)
HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------- preprocessing
@functools.lru_cache(maxsize=None)
def tf1_bilinear_matrix(n_in: int, n_out: int = INPUT_SIZE) -> np.ndarray:
    """(n_out, n_in) matrix of TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`.

    Mirrors TF's `compute_interpolation_weights` with the legacy scaler, in float32 as TF does:
    scale = in / out, src = i * scale, lower = floor(src), upper = min(ceil(src), in - 1),
    lerp = src - floor(src). Downscaling (e.g. 512 -> 299) also just samples two taps.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.arange(n_out, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
    lerp = (src - np.floor(src)).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lower), 1.0 - lerp)
    np.add.at(m, (rows, upper), lerp)
    return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (or float [0, 255]) NHWC images of any size -> (B, 299, 299, 3) float32 in ~[-1, 1]."""
    x = images.astype(jnp.float32)
    h, w = x.shape[1], x.shape[2]
    if h != INPUT_SIZE:
        x = jnp.einsum('oh,bhwc->bowc', tf1_bilinear_matrix(h), x, precision=HIGHEST)
    if w != INPUT_SIZE:
        x = jnp.einsum('pw,bhwc->bhpc', tf1_bilinear_matrix(w), x, precision=HIGHEST)
    return (x - 128.0) / 128.0


# ---------------------------------------------------------------------------- layers
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU, torch-style padding."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


def _max_pool_3x3(x, stride: int):
    """torch MaxPool2d(3, stride), no padding (TF VALID)."""
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding='VALID')


def _avg_pool_3x3_same(x):
    """TF AvgPool 3x3/1 SAME: the padded zeros are not counted (pytorch-fid's count_include_pad=False)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    """3x3/1 max pool, padded with -inf (torch max_pool2d(padding=1))."""
    return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d (pytorch-fid FIDInceptionA)."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (torchvision InceptionB): 35x35 -> 17x17."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..6e (pytorch-fid FIDInceptionC), factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def branches(self, x) -> list[jax.Array]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return [b1, b7, bd, bp]

    def __call__(self, x):
        return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (torchvision InceptionD): 17x17 -> 8x8."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2: the TF graph
    max-pools here, unlike the paper and torchvision)."""

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _avg_pool_3x3_same(x) if self.pool == 'avg' else _max_pool_3x3_same(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """FID InceptionV3 (torchvision layout, 1008-way fc, no aux head). `__call__` takes the
    preprocessed (B, 299, 299, 3) input; `features` takes raw uint8 images."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, 'avg', rngs=rngs)
        self.Mixed_7c = InceptionE(2048, 'max', rngs=rngs)
        self.fc = nnx.Linear(2048, NUM_LOGITS, precision=HIGHEST, rngs=rngs)

    def __call__(self, x) -> dict[str, jax.Array]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, 2)
        x = _max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][..., :SPATIAL_CHANNELS]  # mixed_6/conv: the 1x1 branch of Mixed_6d
        x = jnp.concatenate(branches, axis=-1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = jnp.dot(pool, self.fc.kernel[...], precision=HIGHEST)  # ADM's IS: MatMul only, no bias
        return {'pool': pool, 'spatial': spatial.reshape(spatial.shape[0], -1), 'logits': logits}

    def features(self, images) -> dict[str, jax.Array]:
        """uint8 NHWC images of any size -> {'pool', 'spatial', 'logits'}, float32."""
        return self(preprocess(images))


# ---------------------------------------------------------------------------- weights
_BN_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _torch_name(path: tuple, shape: tuple) -> tuple[str, tuple, bool]:
    """NNX state path -> (state-dict key, torch shape, whether the array is transposed)."""
    *mods, leaf = (str(p) for p in path)
    if leaf == 'kernel' and len(shape) == 4:  # conv HWIO <- OIHW
        return '.'.join(mods + ['weight']), (shape[3], shape[2], shape[0], shape[1]), True
    if leaf == 'kernel':  # fc (in, out) <- (out, in)
        return '.'.join(mods + ['weight']), (shape[1], shape[0]), True
    if mods and mods[-1] == 'bn':
        return '.'.join(mods + [_BN_LEAVES[leaf]]), tuple(shape), False
    return '.'.join(mods + [leaf]), tuple(shape), False


@functools.lru_cache(maxsize=1)
def _layout():
    """(graphdef, {path: abstract variable}, {torch key: (path, torch shape, transposed)}).
    Tracing the module's construction takes seconds on CPU, so it is done once per process."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
    targets = dict(nnx.to_flat_state(state))
    by_key = {}
    for path, var in targets.items():
        key, tshape, transposed = _torch_name(path, tuple(var.shape))
        by_key[key] = (path, tshape, transposed)
    return graphdef, targets, by_key


def state_dict_spec() -> dict[str, tuple[int, ...]]:
    """{state-dict key: torch shape} this module loads (BatchNorm `num_batches_tracked` aside)."""
    return {k: tshape for k, (_, tshape, _) in _layout()[2].items()}


def inception_from_state(sd: dict[str, np.ndarray], source: str = 'Inception state dict') -> InceptionV3:
    """Build the module from a pytorch-fid-layout state dict; any key problem is a ValueError."""
    graphdef, targets, by_key = _layout()
    for key, arr in sd.items():
        if key.endswith('.num_batches_tracked'):  # BatchNorm training bookkeeping
            continue
        if key not in by_key:
            raise ValueError(f'{source}: unexpected key {key!r} (expected the FID Inception weights '
                             'pt_inception-2015-12-05-6726825d.pth, not torchvision\'s inception_v3)')
        _, tshape, _ = by_key[key]
        if tuple(arr.shape) != tshape:
            raise ValueError(f'{source}: key {key!r} has shape {tuple(arr.shape)}, expected {tshape}')
    missing = [k for k in by_key if k not in sd]
    if missing:
        raise ValueError(f'{source}: missing key {missing[0]!r} ({len(missing)} missing in all)')
    values = {}
    for key, (path, _, transposed) in by_key.items():
        arr = np.asarray(sd[key], np.float32)
        if transposed:
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
        values[path] = targets[path].replace(value=np.ascontiguousarray(arr))  # fresh variables
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def read_inception_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The weights file as {key: array} (legacy or zip .pth, .npz, .safetensors; torch-free)."""
    return load_state_dict(check_inception_path(path))


def load_inception(path: str | os.PathLike) -> InceptionV3:
    """InceptionV3 with the pytorch-fid FID weights read from `path` (never downloaded)."""
    path = check_inception_path(path)
    return inception_from_state(read_inception_state(path), source=path)
