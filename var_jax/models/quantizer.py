"""Multi-scale residual vector quantizer (official `VectorQuantizer2`), NHWC.

For each scale k with side pn_k, from coarse to fine:
    r_k   = argmin_v || area(f_rest, pn_k) - E[v] ||          (tokens, row-major)
    h_k   = Phi_k(bicubic(E[r_k], latent))                     (back to the full latent grid)
    f_hat = f_hat + h_k ;  f_rest = f_rest - h_k
One codebook E is shared by all scales; the last scale is never resized. Phi_k is one of a few
partially shared 3x3 convs chosen by the scale's relative position (`phi_table`).
Everything here runs in float32 at full matmul precision: a rounded distance flips a token and
with it every later scale.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models.config import VQVAEConfig
from var_jax.models.resize import resize

HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def phi_table(num_scales: int, share_quant_resi: int) -> tuple[int, ...]:
    """Which Phi each scale uses, computed exactly as the official code does (numpy float64).

    The official lookup is `argmin |ticks - si/(SN-1)|`. For SN=10, K=4 it gives
    (0,0,1,1,1,2,2,3,3,3); scales 2 and 7 are exact ties that float64 settles and float32 would
    not, so this must stay in float64 (tests pin the table).
    """
    k = num_phis(num_scales, share_quant_resi)
    if k == 1:
        return (0,) * num_scales
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    at = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return tuple(int(np.argmin(np.abs(ticks - a))) for a in at)


def num_phis(num_scales: int, share_quant_resi: int) -> int:
    return num_scales if share_quant_resi == 0 else share_quant_resi


def _identity_conv_init(key, shape, dtype=jnp.float32):
    """3x3 conv kernel (HWIO) = centre-tap identity + small noise."""
    kh, kw, cin, cout = shape
    eye = jnp.zeros(shape, dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, cout, dtype=dtype))
    return eye + 0.02 / np.sqrt(kh * kw * cin) * jax.random.normal(key, shape, dtype)


def _symmetric_uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class Phi(nnx.Conv):
    """h -> (1 - r) h + r conv3x3(h): the residual refinement after each upsampled token map."""

    def __init__(self, c: int, ratio: float, *, rngs: nnx.Rngs):
        # Identity-centred init: a fresh tokenizer starts from f_hat = sum of upsampled codes.
        super().__init__(c, c, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_identity_conv_init, rngs=rngs)
        self.ratio = float(ratio)

    def __call__(self, h):
        return (1 - self.ratio) * h + self.ratio * super().__call__(h)


class MultiScaleQuantizer(nnx.Module):
    def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, c = cfg.vocab_size, cfg.z_channels
        # U(-1/V, 1/V), the taming / VAR `eini=-1` codebook init (official weights replace it).
        self.embedding = nnx.Embed(v, c, embedding_init=_symmetric_uniform(1 / v), rngs=rngs)
        if abs(cfg.quant_resi) > 1e-6:
            n = num_phis(cfg.num_scales, cfg.share_quant_resi)
            self.quant_resi = nnx.List([Phi(c, abs(cfg.quant_resi), rngs=rngs) for _ in range(n)])
        else:
            self.quant_resi = None
        self.table = phi_table(cfg.num_scales, cfg.share_quant_resi)

    # ------------------------------------------------------------------ building blocks
    def phi(self, si: int, h: jax.Array) -> jax.Array:
        return h if self.quant_resi is None else self.quant_resi[self.table[si]](h)

    def codebook(self) -> jax.Array:
        return self.embedding.embedding[...].astype(jnp.float32)

    def lookup(self, z: jax.Array) -> jax.Array:
        """Nearest code for every vector of z (..., C) -> int32 (...). Codebook gets no gradient."""
        e = jax.lax.stop_gradient(self.codebook())
        z = jax.lax.stop_gradient(z.astype(jnp.float32))
        if self.cfg.using_znorm:
            zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
            en = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
            return jnp.argmax(jnp.einsum('...c,vc->...v', zn, en, precision=HIGHEST), -1).astype(jnp.int32)
        d = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)
             - 2 * jnp.einsum('...c,vc->...v', z, e, precision=HIGHEST))
        return jnp.argmin(d, -1).astype(jnp.int32)

    def embed(self, idx: jax.Array) -> jax.Array:
        """(B, pn*pn) or (B, pn, pn) tokens -> (B, pn, pn, C) code vectors."""
        b = idx.shape[0]
        pn = idx.shape[1] if idx.ndim == 3 else int(round(idx.shape[1] ** 0.5))
        return jnp.take(self.codebook(), idx.reshape(b, pn, pn), axis=0)

    def upsample_phi(self, si: int, h: jax.Array) -> jax.Array:
        """Token map of scale si (B, pn, pn, C) -> its contribution to f_hat at full latent size."""
        return self.phi(si, resize(h, self.cfg.latent_size, 'bicubic'))

    # ------------------------------------------------------------------ inference paths
    def tokenize(self, f: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """Latent f (B, h, w, C) -> (per-scale tokens [(B, pn*pn) int32], final f_hat)."""
        f = f.astype(jnp.float32)
        f_rest, f_hat = f, jnp.zeros_like(f)
        idx_list = []
        for si, pn in enumerate(self.cfg.patch_nums):
            idx = self.lookup(resize(f_rest, pn, 'area'))  # (B, pn, pn)
            h = self.upsample_phi(si, self.embed(idx))
            f_hat, f_rest = f_hat + h, f_rest - h
            idx_list.append(idx.reshape(idx.shape[0], pn * pn))
        return idx_list, f_hat

    def idx_to_fhat(self, idx_list: list[jax.Array], cumulative: bool = False):
        """Tokens -> f_hat (B, h, w, C); with `cumulative`, the list of f_hat after each scale."""
        f_hat, out = 0.0, []
        for si, idx in enumerate(idx_list):
            f_hat = f_hat + self.upsample_phi(si, self.embed(idx))
            out.append(f_hat)
        return out if cumulative else out[-1]

    def idx_to_var_input(self, idx_list: list[jax.Array]) -> jax.Array:
        """Teacher-forcing input: area(f_hat after scale k -> pn_{k+1}) for k < K-1, (B, L-1, C).

        The transformer sees the *cumulative* f_hat downsampled to the next scale, not r_k.
        The last scale's tokens are only targets.
        """
        pns = self.cfg.patch_nums
        f_hat, nxt = 0.0, []
        for si in range(len(pns) - 1):
            f_hat = f_hat + self.upsample_phi(si, self.embed(idx_list[si]))
            x = resize(f_hat, pns[si + 1], 'area')
            nxt.append(x.reshape(x.shape[0], -1, x.shape[-1]))
        return jnp.concatenate(nxt, axis=1)

    def next_input(self, si: int, f_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Sampler update after scale si with code vectors h (B, pn, pn, C).

        Returns the new f_hat and the next scale's input (B, pn_{si+1}^2, C), None at the end.
        """
        f_hat = f_hat + self.upsample_phi(si, h)
        if si == self.cfg.num_scales - 1:
            return f_hat, None
        x = resize(f_hat, self.cfg.patch_nums[si + 1], 'area')
        return f_hat, x.reshape(x.shape[0], -1, x.shape[-1])

    # ------------------------------------------------------------------ training forward
    def __call__(self, f: jax.Array):
        """Straight-through training forward (official `VectorQuantizer2.forward`).

        Returns (f_hat with straight-through gradient to f, vq loss, aux) where the loss is
        mean over scales of  beta*||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2  on the
        cumulative f_hat_k, and aux holds per-scale token histograms `hits` (K, V) and the
        per-scale pooled residuals `z` (for dead-code re-seeding).
        """
        f = f.astype(jnp.float32)
        f_ng = jax.lax.stop_gradient(f)
        f_rest, f_hat = f_ng, jnp.zeros_like(f)
        loss, hits, zs = 0.0, [], []
        v = self.cfg.vocab_size
        for si, pn in enumerate(self.cfg.patch_nums):
            z = resize(f_rest, pn, 'area')
            idx = self.lookup(z)
            h = self.upsample_phi(si, self.embed(idx))
            f_hat = f_hat + h
            f_rest = f_rest - jax.lax.stop_gradient(h)
            loss = loss + (self.cfg.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
                           + jnp.mean((f_hat - f_ng) ** 2))
            hits.append(jnp.zeros((v,), jnp.float32).at[idx.reshape(-1)].add(1.0))
            zs.append(z)
        loss = loss / self.cfg.num_scales
        f_st = jax.lax.stop_gradient(f_hat) - f_ng + f
        return f_st, loss, {'hits': jnp.stack(hits), 'z': zs}
