"""Zero-shot editing: the image-resolution mask -> per-scale token masks rule (numpy only; the
sampler side is tested through `python -m var_jax.edit` in test_sample_cli.py)."""
from __future__ import annotations

import numpy as np
import pytest

from var_jax.models import PATCH_NUMS_256
from var_jax.sampling.editing import free_tokens, torch_bilinear

# Forced-token masks (1 = keep the input's token) of the official demo_zero_shot_edit.ipynb:
# `get_edit_mask(patch_nums, y0, x0, y1, x1, inpainting)` then `replace_embedding`'s
# `interpolate(bilinear).gt(0.5)` and `ph * pw <= 3` rule, run with torch 2.13 on CPU at the
# 256 px scales; np.packbits of each row-major (pn, pn) mask, in hex.
OFFICIAL = {
    (0.1, 0.1, 0.8, 0.8, True): [
        '80', '00', '2780', '911f', 'fc631f80', 'fe186187f0', 'ff818181818183ff',
        'ffe0380e0380e0380e03fffff0', 'fffffff007803c01e00f007803c01e00f00fffffff80',
        'ffffffffc007c007c007c007c007c007c007c007c007c007c007ffffffffffff'],
    (0.0, 0.0, 0.5, 1.0, True): [  # 16 -> 13 puts the boundary row at 0.50000048: kept
        '80', '30', '0380', '00ff', '0001ff80', '00003ffff0', '00000000ffffffff',
        '0000000000003ffffffffffff0', '00000000000000000003ffffffffffffffffffffff80',
        '00000000000000000000000000000000ffffffffffffffffffffffffffffffff'],
    (0.3, 0.2, 0.9, 0.55, False): [
        '80', '20', '0900', '0440', '0018c000', '0006186000', '0000003030303000',
        '00000000f03c0f03c0f03c0000', '00000000000003e01f00f807c03e01f00f8000000000',
        '000000000000000000001f801f801f801f801f801f801f801f801f8000000000'],
}


def demo_keep_mask(y0, x0, y1, x1, inpainting, k=16) -> np.ndarray:
    """The demo's `get_edit_mask` on the last-scale token grid: 1 = keep."""
    m = np.zeros((k, k))
    m[round(y0 * k):round(y1 * k), round(x0 * k):round(x1 * k)] = 1
    return 1 - m if inpainting else m


@pytest.mark.parametrize('box', list(OFFICIAL))
def test_matches_official_demo(box):
    keep = demo_keep_mask(*box)
    image_mask = np.kron(1 - keep, np.ones((16, 16)))  # 256 px, 1 = generate
    free = free_tokens(image_mask, PATCH_NUMS_256, 256)
    for pn, f, want in zip(PATCH_NUMS_256, free, OFFICIAL[box]):
        forced = np.unpackbits(np.frombuffer(bytes.fromhex(want), np.uint8))[:pn * pn].astype(bool)
        np.testing.assert_array_equal(~f[0], forced, err_msg=f'pn {pn}')


def test_rules():
    pns, s = (1, 2, 4), 8
    assert [f.sum() for f in free_tokens(np.ones((s, s)), pns, s)] == [0, 4, 16], 'the 1x1 scale is always kept'
    assert not any(f.any() for f in free_tokens(np.zeros((s, s)), pns, s))
    m = np.zeros((s, s))
    m[:, :3] = 1  # last-scale tokens (2x2 px) of column 1 are half masked: free (kept only if > half kept)
    free = free_tokens(m, pns, s)[-1].reshape(4, 4)
    assert free[:, :2].all() and not free[:, 2:].any()
    m[:, 2] = 0.49  # a little under half: kept
    assert free_tokens(m, pns, s)[-1].reshape(4, 4)[:, 1].sum() == 0
    batch = free_tokens(np.stack([np.ones((s, s)), np.zeros((s, s))]), pns, s)
    assert batch[-1].shape == (2, 16) and batch[-1][0].all() and not batch[-1][1].any()


@pytest.mark.parametrize('mask,match', [(np.ones((4, 4)), 'S = 8'), (np.full((8, 8), 2.0), r'\[0, 1\]'),
                                        (np.ones((1, 2, 8, 8)), 'S = 8')])
def test_bad_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        free_tokens(mask, (1, 2, 4), 8)


def test_torch_bilinear_properties():
    x = np.random.default_rng(0).uniform(size=(2, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(torch_bilinear(x, 16), x)  # same size: identity
    up = torch_bilinear(np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32), 4)
    np.testing.assert_allclose(up[0, 0], [0, 0.25, 0.75, 1])  # align_corners=False, border clamped
    np.testing.assert_allclose(torch_bilinear(x, 1)[:, 0, 0], x[:, 7:9, 7:9].mean((1, 2)), rtol=1e-6)
