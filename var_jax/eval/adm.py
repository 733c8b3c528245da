"""IS, FID, sFID, precision and recall as OpenAI's ADM suite computes them (guided-diffusion
`evaluations/evaluator.py`), with the Inception features computed in JAX.

    Inception Score  softmax of the bias-free 1008-way logits; exp(mean KL(p(y|x) || p(y))) per
                     consecutive split of 5,000 samples (file order), averaged over splits
    FID              Frechet distance of pool_3 statistics to the reference batch's `mu`, `sigma`
    sFID             the same on mixed_6/conv[..., :7] (2023-d) against `mu_s`, `sigma_s`
    Precision/Recall k-NN manifolds (k=3) on pool_3 (Kynkaanniemi et al.): a point lies on a
                     manifold if it is within the k-th-neighbour radius of one of its points.
                     Precision: samples on the reference manifold (10k reference images);
                     recall: reference images on the sample manifold

Statistics, the Frechet distance (scipy `sqrtm`, the eps retry and the imaginary-part check) and
the k-NN bookkeeping follow ADM. Distances are squared Euclidean, rounded to float16 as ADM's
`DistanceBlock` does (its float32 fallback when a float16 block overflows included), computed in
blocks of 10,000 x 10,000 on one device. Feature extraction is data parallel over the local
devices. See docs/evaluation.md for what differs from the TF suite.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import linalg

from var_jax.eval.inception import InceptionV3, load_inception
from var_jax.eval.inputs import NpzImages, Reference, check_same_size, read_reference
from var_jax.utils import metrics

IS_SPLIT = 5000         # ADM compute_inception_score(split_size=5000)
NHOOD = 3               # ADM ManifoldEstimator(nhood_sizes=(3,))
DIST_BLOCK = 10000      # ADM row/col_batch_size
PROTOCOL_SAMPLES = 50000
METRIC_NAMES = ('Inception Score', 'FID', 'sFID', 'Precision', 'Recall')  # ADM's printed names


# ---------------------------------------------------------------------------- progress
_Progress = metrics.CountProgress


# ---------------------------------------------------------------------------- features

def overlapped(items: Iterable, dispatch, collect) -> None:
    """`collect(dispatch(item))` for every item, in order, but each result is collected only after
    the next item is dispatched: one batch runs on the devices while the host reads the next."""
    pending = None
    for item in items:
        handle = dispatch(item)
        if pending is not None:
            collect(pending)
        pending = handle
    if pending is not None:
        collect(pending)

class FeatureExtractor:
    """Inception features of uint8 NHWC batches, data parallel over a 1-D mesh of devices.

    The batch is split over `devices` (default: this process's local devices) and padded to a
    fixed multiple of the device count, so one program is compiled per image size.
    """

    def __init__(self, model: InceptionV3, batch_size: int = 128, devices=None):
        devices = list(jax.local_devices() if devices is None else devices)
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.mesh = Mesh(np.asarray(devices, dtype=object), ('batch',))
        self.data_sharding = NamedSharding(self.mesh, P('batch'))
        replicated = NamedSharding(self.mesh, P())
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, replicated)

        def forward(state, images):
            return nnx.merge(graphdef, state).features(images)

        self._forward = jax.jit(forward, in_shardings=(replicated, self.data_sharding),
                                out_shardings=self.data_sharding)

    def _dispatch(self, batch: np.ndarray):
        n = len(batch)
        if n > self.batch_size:
            raise ValueError(f'batch of {n} images exceeds batch_size {self.batch_size}')
        if n < self.batch_size:  # pad the tail so every call has the compiled shape
            batch = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)])
        return n, self._forward(self._state, jax.device_put(batch, self.data_sharding))

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Features of up to `batch_size` images: {'pool', 'spatial', 'logits'} as numpy float32."""
        n, out = self._dispatch(np.asarray(images))
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def extract(self, images: NpzImages | np.ndarray, desc: str = 'features') -> dict[str, np.ndarray]:
        """Features of every image, in order, with a progress bar. One batch stays in flight on the
        devices while the next is read from disk."""
        if isinstance(images, np.ndarray):
            total = len(images)
            batches: Iterable[np.ndarray] = (images[i:i + self.batch_size] for i in range(0, total, self.batch_size))
        else:
            total, batches = len(images), images.batches(self.batch_size)
        parts: dict[str, list] = {'pool': [], 'spatial': [], 'logits': []}
        bar = _Progress(total, desc)

        def collect(pending):
            n, out = pending
            for k in parts:
                parts[k].append(np.asarray(out[k])[:n])
            bar.update(n)

        try:
            overlapped(batches, self._dispatch, collect)
        finally:
            bar.close()
        return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------- FID / sFID
@dataclasses.dataclass
class FIDStatistics:
    mu: np.ndarray
    sigma: np.ndarray


def statistics(activations: np.ndarray) -> FIDStatistics:
    """Mean and unbiased covariance (np.cov, rowvar=False), as ADM's compute_statistics."""
    if len(activations) < 2:
        raise ValueError(f'need at least 2 feature vectors for a covariance, got {len(activations)}')
    acts = np.asarray(activations, np.float64)
    return FIDStatistics(acts.mean(axis=0), np.cov(acts, rowvar=False))


def frechet_distance(a: FIDStatistics, b: FIDStatistics, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), ADM's FIDStatistics.frechet_distance."""
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f'statistics of different dimensions: {mu1.shape} vs {mu2.shape}')
    diff = mu1 - mu2
    # ADM calls sqrtm(..., disp=False) and drops the error estimate; `disp` is deprecated since
    # SciPy 1.16, and the plain call returns the same square root.
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():  # nearly singular product
        warnings.warn(f'FID: singular covariance product; adding {eps} to the diagonals')
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):  # rounding can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm')
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------- IS
def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """Mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))). ADM takes log of a float32
    softmax; a float64 log-softmax gives the same value to ~1e-6 and cannot hit log(0)."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i:i + split_size]
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_py), axis=1))))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------- precision / recall
def _sq_dists(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) in u's dtype, accumulating in float32 (ADM's formula)."""
    nu = jnp.sum(jnp.square(u.astype(jnp.float32)), axis=1).astype(u.dtype)
    nv = jnp.sum(jnp.square(v.astype(jnp.float32)), axis=1).astype(u.dtype)
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(u.dtype)
    return jnp.maximum(nu[:, None] - 2 * uv + nv[None, :], 0)


@functools.partial(jax.jit, static_argnames=('half',))
def pairwise_distances(u, v, half: bool = True):
    """(len(u), len(v)) squared distances, float32. With `half`, ADM's DistanceBlock: float16
    inputs and result, unless any float16 distance overflows, then all in float32."""
    u, v = u.astype(jnp.float32), v.astype(jnp.float32)
    if not half:
        return _sq_dists(u, v)
    d16 = _sq_dists(u.astype(jnp.float16), v.astype(jnp.float16))
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32), lambda: _sq_dists(u, v))


def _padded_blocks(x: jax.Array, block: int):
    """(start, valid rows, block) over the rows of x, every block min(block, len(x)) rows (the
    tail zero-padded), so each kernel below compiles once."""
    b = min(block, len(x))
    for start in range(0, len(x), b):
        blk = x[start:start + b]
        valid = blk.shape[0]
        yield start, valid, (jnp.pad(blk, ((0, b - valid), (0, 0))) if valid < b else blk)


def _padded_radii(radii: np.ndarray, start: int, valid: int, b: int) -> jax.Array:
    """Radii of one block; padding rows get -1, a ball that holds nothing (distances are >= 0)."""
    out = np.full(b, -1.0, np.float32)
    out[:valid] = radii[start:start + valid]
    return jnp.asarray(out)


@functools.partial(jax.jit, static_argnames=('k1', 'half'))
def _smallest(u, v, v_valid, k1: int, half: bool):
    """The k1 smallest distances from each row of u to the first v_valid rows of v, ascending."""
    d = pairwise_distances(u, v, half)
    d = jnp.where(jnp.arange(v.shape[0])[None, :] < v_valid, d, jnp.inf)
    return -jax.lax.top_k(-d, k1)[0]


def manifold_radii(features: np.ndarray, k: int = NHOOD, block: int = DIST_BLOCK, half: bool = True) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in `features` (itself, at
    distance 0, counts as the 0-th: ADM's np.partition(...)[:, k])."""
    n = len(features)
    if n <= k:
        raise ValueError(f'precision/recall need more than k={k} feature vectors, got {n}')
    feats = jnp.asarray(features, jnp.float32)
    cols = list(_padded_blocks(feats, block))
    k1 = min(k + 1, cols[0][2].shape[0])
    radii = np.zeros(n, np.float32)
    for start, valid, rows in _padded_blocks(feats, block):
        cand = np.concatenate([np.asarray(_smallest(rows, blk, n_valid, k1, half)) for _, n_valid, blk in cols], 1)
        radii[start:start + valid] = np.sort(cand, axis=1)[:valid, k]
    return radii


@functools.partial(jax.jit, static_argnames=('half',))
def _in_balls(u, ru, v, rv, half: bool):
    d = pairwise_distances(u, v, half)
    u_in_v = jnp.any(d <= rv[None, :], axis=1)  # u inside some ball around a point of v
    v_in_u = jnp.any(d <= ru[:, None], axis=0)
    return u_in_v, v_in_u


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = NHOOD, block: int = DIST_BLOCK,
                     half: bool = True) -> tuple[float, float]:
    """(precision, recall) of `samples` against `ref` (ADM compute_prec_recall / evaluate_pr)."""
    r_ref = manifold_radii(ref, k, block, half)
    r_smp = manifold_radii(samples, k, block, half)
    ref_in = np.zeros(len(ref), bool)      # reference point on the sample manifold
    smp_in = np.zeros(len(samples), bool)  # sample on the reference manifold
    smp_blocks = list(_padded_blocks(jnp.asarray(samples, jnp.float32), block))
    for i, ni, u in _padded_blocks(jnp.asarray(ref, jnp.float32), block):
        ru = _padded_radii(r_ref, i, ni, u.shape[0])
        for j, nj, v in smp_blocks:
            a, b = _in_balls(u, ru, v, _padded_radii(r_smp, j, nj, v.shape[0]), half)
            ref_in[i:i + ni] |= np.asarray(a)[:ni]
            smp_in[j:j + nj] |= np.asarray(b)[:nj]
    return float(smp_in.mean()), float(ref_in.mean())


# ---------------------------------------------------------------------------- the suite
def adm_metrics(sample_acts: dict[str, np.ndarray], ref_pool: np.ndarray, ref: Reference) -> dict[str, float]:
    """ADM's five numbers from sample features, reference pool features and reference stats."""
    fid = frechet_distance(statistics(sample_acts['pool']), FIDStatistics(ref.mu, ref.sigma))
    sfid = frechet_distance(statistics(sample_acts['spatial']), FIDStatistics(ref.mu_s, ref.sigma_s))
    prec, rec = precision_recall(ref_pool, sample_acts['pool'])
    return dict(zip(METRIC_NAMES, (inception_score(sample_acts['logits']), fid, sfid, prec, rec)))


def evaluate(samples: NpzImages | str | os.PathLike, ref: Reference | str | os.PathLike,
             inception: FeatureExtractor | InceptionV3 | str | os.PathLike, batch_size: int = 128,
             devices=None) -> dict[str, float]:
    """Run the suite: samples and reference batches as paths or opened readers; the Inception as
    a weights path, a loaded module or a ready FeatureExtractor (whose batch size and devices are
    then used). Inputs are validated before any features are computed."""
    samples = samples if isinstance(samples, NpzImages) else NpzImages(samples, what='samples')
    ref = ref if isinstance(ref, Reference) else read_reference(ref)
    check_same_size(samples, ref)
    if len(samples) <= NHOOD or len(ref.images) <= NHOOD:
        raise ValueError(f'need more than {NHOOD} sample and reference images, got {len(samples)} and '
                         f'{len(ref.images)}')
    if len(samples) != PROTOCOL_SAMPLES:
        print(f'note: {len(samples)} samples; the ADM protocol uses {PROTOCOL_SAMPLES:,} (50 per class)',
              file=sys.stderr)
    if isinstance(inception, FeatureExtractor):
        extractor = inception
    else:
        model = inception if isinstance(inception, InceptionV3) else load_inception(inception)
        extractor = FeatureExtractor(model, batch_size, devices)
    ref_pool = extractor.extract(ref.images, 'reference')['pool']
    sample_acts = extractor.extract(samples, 'samples')
    return adm_metrics(sample_acts, ref_pool, ref)


def format_results(results: dict[str, float]) -> str:
    """One `Name: value` line per metric, as ADM's evaluator prints them."""
    return '\n'.join(f'{k}: {results[k]}' for k in METRIC_NAMES)

