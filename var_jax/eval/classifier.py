"""The built-in judge: a small CNN trained on real shapes10 images, independent of the generator.

It scores models trained on the built-in data (see builtin_score.py, docs/builtin_eval.md); `fit`
trains the same network on any labelled images (the judge of an image-folder run, folder_score.py):
`predict` gives the class a sample looks like, `features` (the 128-d penultimate layer) is the
space the Fréchet distances are computed in. It never sees a generated image in training.

    standardise each image (mean 0, std 1 over all pixels and channels: colour and contrast carry
    no class information in shapes10, so the judge need not learn to ignore them)
    -> space-to-depth 2x2 (32x32x3 -> 16x16x12, lossless)
    -> conv3x3 32, ReLU, max-pool 2 -> conv3x3 64, ReLU, max-pool 2 -> conv3x3 128, ReLU
    -> global average pool -> dense 128, ReLU (= features) -> dense 10 (logits)

Training: 6 epochs of the 10,000 training images, batch 128, AdamW with warm-up + cosine,
random horizontal / vertical flips (class-preserving for all ten classes; a transpose is not,
it swaps h- and v-stripes). About 40 s on 2 busy CPU cores, ~98 % on the 1,000 test images.
The space-to-depth input is there for speed: XLA:CPU runs a 3-channel 32x32 convolution (and
its gradient) several times slower per FLOP than the same work as a 12-channel 16x16 one.

Trained parameters are cached in `$VAR_JAX_CACHE` (default ~/.cache/var_jax/) under a name that
hashes this file, the data generator, the config and the seed, so evaluations do not retrain and
a change to any of them does. An unreadable cache file is trained over, never an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time
import uuid
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from var_jax.data import builtin

INPUT_SIZE = 32
EVAL_BATCH = 250  # one compiled forward for every evaluation set (the tail is padded)
CONFIG = dict(channels=(32, 64, 128), width=128, epochs=6, batch_size=128, lr=5e-3, weight_decay=1e-4,
              warmup_epochs=0.5, std_eps=0.05)


# ---------------------------------------------------------------------------- the network
def _space_to_depth(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def _max_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max((2, 4))


class ShapesCNN(nnx.Module):
    def __init__(self, channels=CONFIG['channels'], width=CONFIG['width'], num_classes=builtin.NUM_CLASSES, *,
                 std_eps=CONFIG['std_eps'], rngs: nnx.Rngs):
        cins = (12,) + tuple(channels[:-1])
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(cins, channels)])
        self.fc = nnx.Linear(channels[-1], width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)
        self.std_eps = std_eps

    def features(self, x):
        """Images NHWC float in [0, 1], 32x32 -> (N, width) penultimate activations."""
        x = x - x.mean((1, 2, 3), keepdims=True)
        h = _space_to_depth(x / (x.std((1, 2, 3), keepdims=True) + self.std_eps))
        for i, conv in enumerate(self.convs):
            h = nnx.relu(conv(h))
            if i < len(self.convs) - 1:
                h = _max_pool(h)
        return nnx.relu(self.fc(h.mean((1, 2))))

    def __call__(self, x):
        return self.head(self.features(x))


def to_input(images) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] NHWC RGB -> float32 [0, 1] at 32x32 (antialiased resize)."""
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), 'linear', antialias=True)
    return x


def new_model(seed: int = 0, config: dict = CONFIG, num_classes: int = builtin.NUM_CLASSES) -> ShapesCNN:
    """Fresh parameters, initialised in one jitted program at -O0: run eagerly, XLA:CPU compiles
    every random-number op on its own, which took seconds (see var_jax.models.create)."""
    def make():
        return ShapesCNN(config['channels'], config['width'], num_classes, std_eps=config['std_eps'],
                         rngs=nnx.Rngs(seed))

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()), compiler_options=options)())


@nnx.jit
def _forward(model: ShapesCNN, images):
    feats = model.features(to_input(images))
    return feats, model.head(feats)


# ---------------------------------------------------------------------------- the judge
@dataclasses.dataclass
class Judge:
    """A trained classifier with batched numpy entry points."""

    model: ShapesCNN
    test_acc: float  # on the held-out real images (shapes10: its 1,000 test images)
    train_seconds: float  # how long training took when these parameters were made
    cached: bool  # loaded from the cache rather than trained in this process

    def outputs(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, H, W, 3), uint8 or float in [0, 1] -> (features (N, D), logits (N, classes))."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f'expected a non-empty batch of RGB images (N, H, W, 3), got {images.shape}')
        feats, logits = [], []
        for i in range(0, len(images), EVAL_BATCH):
            batch = images[i:i + EVAL_BATCH]
            n = len(batch)
            if n < EVAL_BATCH:  # pad: one input shape, one compilation
                batch = np.concatenate([batch, np.zeros((EVAL_BATCH - n,) + batch.shape[1:], batch.dtype)])
            f, lg = _forward(self.model, batch)
            feats.append(np.asarray(f)[:n])
            logits.append(np.asarray(lg)[:n])
        return np.concatenate(feats).astype(np.float64), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        return self.outputs(images)[0]

    def predict(self, images) -> np.ndarray:
        return self.outputs(images)[1].argmax(-1).astype(np.int32)


def accuracy(judge: Judge, split: str = 'test') -> float:
    images, labels = builtin.load(split)
    return float(np.mean(judge.predict(images) == labels))


# ---------------------------------------------------------------------------- training
def train(seed: int = 0, config: dict = CONFIG, *, verbose: bool = True) -> Judge:
    """Train on shapes10/train from scratch; deterministic given `seed` (and the XLA build)."""
    images, labels = builtin.load('train')
    judge = fit(images, labels, builtin.NUM_CLASSES, seed, config, verbose=verbose)
    judge.test_acc = accuracy(judge)
    return judge


def _shift(x, key, pad: int = 2):
    """Random translation by up to `pad` pixels (edge padding): class-preserving for any labelled
    images, unlike flips (digits, letters, faces)."""
    b, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')
    off = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(xp, off)


def fit(images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0, config: dict = CONFIG, *,
        augment: str = 'flips', verbose: bool = True) -> Judge:
    """Train a judge on uint8 `images` (N, 32, 32, 3) with `labels`; `augment` 'flips' (random
    horizontal / vertical flips: shapes10) or 'shift' (random translation by up to 2 px: any
    labelled folder, var_jax/eval/folder_score.py). `test_acc` is left at 0 for the caller."""
    t0 = time.time()
    c = config
    graphdef, params = nnx.split(new_model(seed, c, num_classes))
    steps_per_epoch = len(labels) // c['batch_size']
    total = steps_per_epoch * c['epochs']
    sched = optax.warmup_cosine_decay_schedule(0.0, c['lr'], int(c['warmup_epochs'] * steps_per_epoch), total)
    tx = optax.adamw(sched, weight_decay=c['weight_decay'])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        x = x.astype(jnp.float32) / 255
        if augment == 'flips':
            flip = jax.random.bernoulli(key, 0.5, (2, x.shape[0], 1, 1, 1))
            x = jnp.where(flip[0], x[:, :, ::-1], x)
            x = jnp.where(flip[1], x[:, ::-1], x)
        else:
            x = _shift(x, key)

        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    for epoch in range(c['epochs']):
        perm = rng.permutation(len(labels))  # the remainder (< one batch) is skipped this epoch
        for i in range(steps_per_epoch):
            idx = perm[i * c['batch_size']:(i + 1) * c['batch_size']]
            params, opt_state, loss = step(params, opt_state, images[idx], labels[idx],
                                           jax.random.fold_in(key, epoch * steps_per_epoch + i))
        if verbose and ((epoch + 1) % max(1, c['epochs'] // 10) == 0 or epoch + 1 == c['epochs']):
            print(f'[judge] epoch {epoch + 1}/{c["epochs"]} loss {float(loss):.3f} ({time.time() - t0:.0f} s)',
                  file=sys.stderr, flush=True)
    jax.block_until_ready(params)
    return Judge(nnx.merge(graphdef, params), 0.0, time.time() - t0, cached=False)


# ---------------------------------------------------------------------------- cache
def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get('VAR_JAX_CACHE') or pathlib.Path.home() / '.cache' / 'var_jax')


def cache_key(seed: int = 0, config: dict = CONFIG) -> str:
    """Changes whenever the network, its training or the data could: this file, the generator, config."""
    h = hashlib.sha256()
    for f in (pathlib.Path(__file__), pathlib.Path(builtin.__file__)):
        h.update(f.read_bytes())
    h.update(json.dumps({'config': config, 'seed': seed}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_path(seed: int = 0, config: dict = CONFIG, directory=None) -> pathlib.Path:
    d = pathlib.Path(directory) if directory is not None else cache_dir()
    return d / f'shapes10_judge-seed{seed}-{cache_key(seed, config)}.npz'


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def save(judge: Judge, path) -> None:
    """Write atomically: a temporary sibling, then a rename (readers never see half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp'
    try:
        with open(tmp, 'wb') as fh:
            np.savez(fh, **{'param' + k: v for k, v in _flat(nnx.state(judge.model, nnx.Param)).items()},
                     meta=np.asarray(json.dumps({'test_acc': judge.test_acc, 'train_seconds': judge.train_seconds})))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path, seed: int = 0, config: dict = CONFIG, num_classes: int = builtin.NUM_CLASSES) -> Judge:
    """Parameters from `path` into a fresh network; raises on anything missing or misshapen."""
    model = nnx.eval_shape(lambda: ShapesCNN(config['channels'], config['width'], num_classes,
                                              std_eps=config['std_eps'], rngs=nnx.Rngs(seed)))  # shapes only
    graphdef, params = nnx.split(model, nnx.Param)
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z['meta']))
        stored = {k: z[k] for k in z.files if k.startswith('param')}

    def take(p, v):
        a = stored.pop('param' + jax.tree_util.keystr(p))
        if a.shape != v.shape or a.dtype != v.dtype:
            raise ValueError(f'{jax.tree_util.keystr(p)}: {a.dtype}{a.shape}, expected {v.dtype}{v.shape}')
        return jnp.asarray(a)

    params = jax.tree_util.tree_map_with_path(take, params)
    if stored:
        raise ValueError(f'unexpected arrays {sorted(stored)[:3]}')
    nnx.update(model, params)
    return Judge(model, float(meta['test_acc']), float(meta['train_seconds']), cached=True)


_JUDGES: dict[tuple, Judge] = {}  # per process: several evaluations in one run share one judge


def get_judge(seed: int = 0, *, directory=None, verbose: bool = True) -> Judge:
    """The cached judge for `seed`, training (about a minute on a CPU) and caching it if needed."""
    path = cache_path(seed, CONFIG, directory)
    if (seed, str(path)) in _JUDGES and path.exists():
        return _JUDGES[seed, str(path)]
    judge = None
    if path.exists():
        try:
            judge = load(path, seed)
        except Exception as e:  # noqa: BLE001  (any unreadable cache file is simply trained over)
            warnings.warn(f'{path}: unreadable judge cache ({type(e).__name__}: {e}); retraining')
    if judge is None:
        if verbose:
            print(f'[judge] training the shapes10 classifier once (cached at {path})', file=sys.stderr, flush=True)
        judge = train(seed, verbose=verbose)
        try:
            save(judge, path)
        except OSError as e:  # a read-only cache costs time on the next run, not this result
            warnings.warn(f'{path}: cannot cache the judge ({e})')
    _JUDGES[seed, str(path)] = judge
    return judge
