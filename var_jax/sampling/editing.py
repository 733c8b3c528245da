"""Zero-shot editing: in-painting, out-painting and class-conditional editing (VAR paper, "zero-shot
task generalization"; official `demo_zero_shot_edit.ipynb`).

The input image is tokenised at every scale. The sampler then runs as usual, except that at each
scale k the tokens outside the edit region are replaced by the input's tokens r_k (teacher
forcing); only the tokens inside are sampled, conditioned on everything forced so far. No
training is involved. The three tasks differ only in which region is free and in the label:

    inpaint     free = the given hole;             label: unconditional (the official demo's 1000)
    outpaint    free = everything outside `keep`;  label: unconditional
    class_edit  free = the given region;           label: the target class

Images are NHWC float in [0, 1] (what `generate.sample` returns); masks are given at image
resolution, (S, S) or (B, S, S), 1 = generate and 0 = keep, and may be fractional.

Mask -> token grid of every scale (the official rule, generalised to image-resolution masks):
  1. m = fraction of each last-scale token's pixel patch (S/pn_K square) that is to be generated
     (area average);
  2. keep_k = bilinear resize of 1 - m to pn_k x pn_k (torch `interpolate(mode='bilinear',
     align_corners=False)`, no antialiasing, float32: what the demo's `replace_embedding` does);
  3. a token is kept (forced) iff keep_k > 0.5 (the demo's `.gt(0.5)`), free otherwise: roughly,
     free when at least half of the area around its centre is to be generated;
  4. scales with at most 3 tokens (the 1x1 scale) are always kept (the demo's `ph * pw <= 3`):
     the first token fixes the global colour layout of the input.
For a mask drawn on the token grid (a 0/1 mask constant on each S/pn_K patch) steps 1-4 give
exactly the demo's forced-token masks. Step 2 samples near token centres rather than averaging:
a hole covering only the edge of a coarse token leaves that token forced, and finer scales fill
the hole in.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.data.images import load_image_and_mask
from var_jax.io import outputs
from var_jax.io.checkpoint import open_checkpoint
from var_jax.models import VAR, VQVAE
from var_jax.sampling import generate
from var_jax.sampling.settings import Settings, check_labels

ALWAYS_KEEP = 3  # scales with pn*pn <= 3 tokens are never edited (official `if ph * pw <= 3`)


def torch_bilinear(x: np.ndarray, n_out: int) -> np.ndarray:
    """(B, n, n) -> (B, n_out, n_out): torch's CPU `interpolate(mode='bilinear', align_corners=False)`
    without antialias, in float32 as torch computes it, so that values landing on the 0.5 threshold
    round the way the demo's do (16 -> 13 puts a half-masked row at 0.50000048, not 0.5: torch's
    source coordinate `scale * (i + 0.5) - 0.5` is one fused multiply-add in float32). Against
    torch 2.13 the `> 0.5` decisions agree on every binary mask tried (16 and 32 token grids)."""
    x = np.asarray(x, np.float32)
    n_in = x.shape[-1]
    scale = np.float32(n_in) / np.float32(n_out)
    half = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * half.astype(np.float64) - 0.5).astype(np.float32)  # fma, rounded once
    src = np.maximum(src, np.float32(0))  # torch clamps negative source coordinates to 0
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = src - i0.astype(np.float32)
    l0 = np.float32(1) - l1
    rows = x[:, :, i0] * l0 + x[:, :, i1] * l1  # along the width first, then the height (torch's loop order)
    return rows[:, i0, :] * l0[:, None] + rows[:, i1, :] * l1[:, None]


def _as_masks(mask, batch: int | None, size: int) -> np.ndarray:
    m = np.asarray(mask, np.float64)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != (size, size):
        raise ValueError(f'mask must be (S, S) or (B, S, S) with S = {size}, got {np.shape(mask)}')
    if batch is not None and m.shape[0] not in (1, batch):
        raise ValueError(f'{m.shape[0]} masks for {batch} images')
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError('mask values must be in [0, 1] (1 = generate, 0 = keep)')
    return m if batch is None else np.broadcast_to(m, (batch, size, size))


def free_tokens(mask, patch_nums, image_size: int) -> list[np.ndarray]:
    """Image-resolution mask(s), 1 = generate -> per scale (B, pn*pn) bool, True = sampled
    (row-major like the tokens). See the module docstring for the rule."""
    m = _as_masks(mask, None, image_size)
    k = patch_nums[-1]
    if image_size % k:
        raise ValueError(f'image size {image_size} is not a multiple of the last scale {k}')
    s = image_size // k
    frac = m.reshape(m.shape[0], k, s, k, s).mean(axis=(2, 4))  # generated fraction of each token
    keep = (1 - frac).astype(np.float32)  # the demo interpolates the keep mask; so do we, for equal rounding
    out = []
    for pn in patch_nums:
        free = ~(torch_bilinear(keep, pn) > 0.5)  # demo: force_gt = bilinear(keep).gt(0.5)
        if pn * pn <= ALWAYS_KEEP:
            free[:] = False
        out.append(free.reshape(m.shape[0], pn * pn))
    return out


def edit(var: VAR, vqvae: VQVAE, images, mask, labels, key, cfg: float = 3.0, top_k: int = 900,
         top_p: float = 0.95, more_smooth: bool = False):
    """Regenerate the masked part of `images` (B, S, S, 3) in [0, 1], keeping the rest's tokens.

    `mask`: (S, S) or (B, S, S), 1 = generate. `labels`: (B,) or one int; `var.config.num_classes`
    is the unconditional (null) class, with which guidance has no effect. `key`: one PRNG key
    (row i uses fold_in(key, i)) or one per image.
    Returns (edited images (B, S, S, 3) in [0, 1], per-scale tokens [(B, pn*pn)], per-scale free
    masks [(B, pn*pn) bool]): outside the free masks the tokens are exactly the input's.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f'images must be NHWC (B, S, S, 3), got {images.shape}')
    b, size = images.shape[0], vqvae.config.image_size
    if np.ndim(labels) == 0:
        labels = np.full((b,), int(labels), np.int32)
    free = free_tokens(_as_masks(mask, b, size), vqvae.config.patch_nums, size)
    tokens = vqvae.img_to_idx(images * 2 - 1)  # checks shape and range
    teacher = (tokens, [jnp.asarray(f) for f in free])
    out, idx_list = generate.sample(var, vqvae, labels, key, cfg, top_k, top_p, more_smooth, teacher=teacher)
    return out, idx_list, free


def inpaint(var: VAR, vqvae: VQVAE, images, hole, key, label: int | None = None, **kw):
    """Fill `hole` (1 = generate). Unconditional unless `label` is given, as in the official demo."""
    return edit(var, vqvae, images, hole, var.config.num_classes if label is None else label, key, **kw)


def outpaint(var: VAR, vqvae: VQVAE, images, keep, key, label: int | None = None, **kw):
    """Keep the content under `keep` (1 = keep) and generate everything around it."""
    return edit(var, vqvae, images, 1 - np.asarray(keep, np.float64), var.config.num_classes if label is None
                else label, key, **kw)


def class_edit(var: VAR, vqvae: VQVAE, images, region, label: int, key, **kw):
    """Redraw `region` (1 = generate) as class `label`, guided by it; the rest stays."""
    if label is None:
        raise ValueError('class_edit needs a class')
    check_labels(label, var.config.num_classes)
    return edit(var, vqvae, images, region, label, key, **kw)


# ---------------------------------------------------------------------------- one image file
MODES = ('inpaint', 'outpaint', 'edit')


def edit_file(checkpoint: str, image: str, mask: str, out: str, settings: Settings, *, mode: str = 'inpaint',
              label: int | None = None, seed: int = 0, step: int | None = None, force: bool = False,
              dtype: str | None = None) -> None:
    """Edit the image file `image` under the mask file `mask` (white = the region of `mode`, see
    var_jax.edit) with the checkpoint's models and write the S x S result to `out`. Unconditional
    unless `label` is given (required for mode 'edit'). Inputs and the output path are checked
    before the model is loaded."""
    ck = open_checkpoint(checkpoint, step)
    n = ck.num_classes
    if label is None and mode == 'edit':
        raise ValueError('--mode edit needs --class: the class to redraw the masked region as')
    if label is not None:
        check_labels(label, n)
    rgb, m = load_image_and_mask(image, mask, ck.image_size)
    outputs.image_format(out)  # before the model is loaded
    outputs.check_file_output(out, force=force)
    vqvae, var = ck.load(dtype)
    label = n if label is None else label  # n: the null class, unconditional as in the demo
    region = 1 - m if mode == 'outpaint' else m  # `edit` wants 1 = generate
    edited, _, free = edit(var, vqvae, rgb[None], region, label, jax.random.key(seed), cfg=settings.cfg,
                           top_k=settings.top_k, top_p=settings.top_p, more_smooth=settings.more_smooth)
    outputs.save_image(out, np.asarray(edited[0]))
    sampled = sum(int(f.sum()) for f in free)
    print(f'wrote {out}: {mode}, {sampled}/{sum(f.size for f in free)} tokens generated, '
          f'{"unconditional" if label == n else f"class {label}"}, {settings.describe()}, seed {seed}',
          file=sys.stderr)

