"""Batched sampling of many (class, index) images: the one padded batch sampler.

Image (class c, index i) uses the key fold_in(fold_in(key(seed), c), i) (`generate.image_keys`):
it depends on the seed, the class and the index only, never on the batch size, the device count or
the other images of its batch. Every batch has the compiled size: the last one is padded with
copies of its first row (and the padding cut off again), so one program serves a whole run.

With `devices` the batch is split over a 1-D mesh of them (the model replicated, labels and keys
sharded on the batch axis) and rounded up to a multiple of the device count; without, the arrays
go to `generate.sample` as they are and stay where the model's parameters are (the built-in score
on one device, in-training evaluation on the training mesh). One batch stays in flight on the
devices while the previous one is copied back.

Used by `python -m var_jax.sample` (uint8 images, progression strips), the built-in score
(var_jax.eval.builtin_score) and the in-training sample grid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax.sampling import generate
from var_jax.sampling.settings import Settings
from var_jax.utils import metrics


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad a short batch with copies of its first row: every call has the same shape."""
    return x if len(x) == size else np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def host_array(x) -> np.ndarray:
    """A (possibly multi-process) jax array as a host numpy array on every process."""
    if getattr(x, 'is_fully_addressable', True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_uint8(x):
    """viz.to_uint8 on device (4x less to copy back): clip(255 x + 0.5) truncated, i.e. rounded."""
    return (jnp.clip(x, 0, 1) * 255 + 0.5).astype(jnp.uint8)


@nnx.jit(static_argnames=('progression',))
def _finish(vqvae, images, idx_list, progression: bool):
    frames = None
    if progression:  # decode the cumulative f_hat after every scale, all scales as one batch
        f_hats = vqvae.quantize.idx_to_fhat(idx_list, cumulative=True)
        b, k = images.shape[0], len(f_hats)
        x = (vqvae.decode(jnp.concatenate(f_hats)) + 1) / 2
        frames = to_uint8(x.reshape((k, b) + x.shape[1:]).swapaxes(0, 1))  # (B, K, S, S, 3)
    return to_uint8(images), frames


def progress_bar(total: int, done: int = 0, desc: str = 'sampling') -> metrics.CountProgress:
    return metrics.CountProgress(total, desc, done)


def local_devices(n: int | None = None) -> list:
    """The first `n` devices (default: all) of a single-process run."""
    devices = jax.devices()
    if jax.process_count() > 1:
        raise ValueError('multi-process sampling is not supported yet: run it on one host')
    if n is not None and n > len(devices):
        raise ValueError(f'--num_devices {n}: only {len(devices)} devices here')
    return devices[:n] if n else devices


class Sampler:
    """(class, index) batches -> images, `batch_size` at a time (see the module docstring).

    Images come back as float32 in [0, 1], or with `uint8` rounded to uint8 on the devices. With
    `progression` (implies uint8) each image also comes decoded after every scale (from the sampled
    tokens: with more_smooth the last frame is the unsmoothed image).
    """

    def __init__(self, var, vqvae, settings: Settings, seed: int, batch_size: int, devices=None, *,
                 uint8: bool = False, progression: bool = False):
        self.var, self.vqvae, self.s, self.seed = var, vqvae, settings, seed
        self.uint8, self.progression = uint8 or progression, progression
        self.rows = None
        if devices is None:
            self.batch_size = batch_size
        else:
            devices = list(devices)
            self.batch_size = -(-batch_size // len(devices)) * len(devices)
            mesh = Mesh(np.asarray(devices, dtype=object), ('batch',))
            self.rows = NamedSharding(mesh, P('batch'))
            replicated = NamedSharding(mesh, P())
            for m in (var, vqvae):
                nnx.update(m, jax.device_put(nnx.state(m), replicated))

    def _put(self, x):
        return x if self.rows is None else jax.device_put(x, self.rows)

    def dispatch(self, labels: np.ndarray, index: np.ndarray):
        """Start one batch (asynchronously); `collect` waits for it."""
        n = len(labels)
        labels = pad_rows(np.asarray(labels), self.batch_size).astype(np.int32)
        index = pad_rows(np.asarray(index), self.batch_size).astype(np.int64)
        keys = self._put(generate.image_keys(self.seed, labels, index))
        s = self.s
        images, idx_list = generate.sample(self.var, self.vqvae, self._put(labels), keys,
                                           s.cfg, s.top_k, s.top_p, s.more_smooth)
        if self.uint8:
            return n, _finish(self.vqvae, images, idx_list, self.progression)
        return n, (images, None)

    @staticmethod
    def collect(pending):
        n, (images, frames) = pending
        return host_array(images)[:n], None if frames is None else host_array(frames)[:n]

    def run(self, labels: np.ndarray, index: np.ndarray, progress=None):
        """Yield (start, images, frames) batch by batch, in order; one batch stays in flight on the
        devices while the previous one is copied back and stored."""
        pending = None
        for start in range(0, len(labels), self.batch_size):
            nxt = start, self.dispatch(labels[start:start + self.batch_size], index[start:start + self.batch_size])
            if pending is not None:
                yield self._done(pending, progress)
            pending = nxt
        if pending is not None:
            yield self._done(pending, progress)

    def _done(self, pending, progress):
        start, p = pending
        images, frames = self.collect(p)
        if progress is not None:
            progress.update(len(images))
        return start, images, frames

    def sample(self, labels: np.ndarray, index: np.ndarray, progress=None) -> np.ndarray:
        """All images of (labels, index), in order, as one host array."""
        return np.concatenate([images for _, images, _ in self.run(labels, index, progress)])
