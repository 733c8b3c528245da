"""Regenerate torch_resize.npz: the resize matrices of torch's F.interpolate (needs torch).

    python tests/data/make_torch_resize.py

Each matrix M (out, in) is torch's operator applied to the identity basis, in float64, for every
(in, out) pair used by the 256 and 512 scale sets (area downsamples, bicubic upsamples).
"""
import numpy as np
import torch
import torch.nn.functional as F

PNS = sorted({1, 2, 3, 4, 5, 6, 8, 10, 13, 16} | {1, 2, 3, 4, 6, 9, 13, 18, 24, 32})


def matrix(n_in, n_out, mode):
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 3)
    kw = {} if mode == 'area' else {'align_corners': False}
    out = F.interpolate(eye, size=(n_out, 3), mode=mode, **kw)[:, 0, :, 1]  # (in, out)
    return out.T.numpy()


arrays = {}
for full in (16, 32):
    for pn in PNS:
        if pn < full:
            arrays[f'area_{full}_{pn}'] = matrix(full, pn, 'area')
            arrays[f'bicubic_{pn}_{full}'] = matrix(pn, full, 'bicubic')
np.savez_compressed(__file__.replace('make_torch_resize.py', 'torch_resize.npz'), **arrays)
print(len(arrays), 'matrices')
