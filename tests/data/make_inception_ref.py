"""Regenerate inception_ref.npz: pytorch-fid's FID InceptionV3 on random weights (needs torch).

    pip install pytorch-fid==0.3.0     # into a torch environment; brings torchvision
    python tests/data/make_inception_ref.py

No weights are downloaded: pytorch-fid's `fid_inception_v3()` is run with its download function
replaced by `random_state_dict`, so its own strict `load_state_dict` checks our key list. Every
value comes from numpy (`random_value`, seeded per key), so tests/test_eval.py rebuilds the same
weights without torch, loads them through `var_jax.eval.inception`, and compares the outputs.

The input path is ADM's: uint8 images -> TF1 bilinear resize to 299 (written here in torch,
following TF's legacy kernel, independently of var_jax's matrix form) -> (x - 128) / 128.
Stored: pool features, the 17x17x7 sFID map (NHWC), ADM's bias-free logits, the torch key list,
and a tiny legacy-format (pre-zip) torch file for the torch-free legacy reader.
The helpers above `main` use numpy only: the CI test imports them from this file.
"""
import io
import json
import zlib

import numpy as np

SEED = 2015
IMAGE_SHAPE = (2, 256, 320, 3)  # H upsampled to 299 (as 256-px samples are), W downsampled


def random_value(key: str, shape, seed: int = SEED) -> np.ndarray:
    """Deterministic value for one state-dict entry; scales keep activations O(1)."""
    if key.endswith('num_batches_tracked'):
        return np.array(0, np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    leaf = key.rsplit('.', 1)[-1]
    shape = tuple(shape)
    if '.bn.' in key:
        if leaf == 'weight':
            v = rng.uniform(0.6, 1.4, shape)
        elif leaf == 'bias':
            v = rng.normal(0.0, 0.2, shape)
        elif leaf == 'running_mean':
            v = rng.normal(0.0, 0.2, shape)
        else:  # running_var
            v = rng.uniform(0.5, 2.0, shape)
    elif key == 'fc.weight':
        v = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    elif key == 'fc.bias':
        v = rng.normal(0.0, 0.5, shape)
    else:  # conv OIHW: He-normal on the fan-in
        v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    return v.astype(np.float32)


def random_state_dict(spec: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    return {k: random_value(k, s, seed) for k, s in spec.items()}


def test_images() -> np.ndarray:
    """Two uint8 images with smooth structure plus noise (so the resize matters)."""
    rng = np.random.default_rng(SEED)
    n, h, w, _ = IMAGE_SHAPE
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    base = [128 + 90 * np.sin(yy / 17.0 + c) * np.cos(xx / 23.0 - c) for c in range(3)]
    base = np.stack(base, -1)[None]
    noise = rng.normal(0, 25, IMAGE_SHAPE)
    flip = np.array([1.0, -1.0]).reshape(2, 1, 1, 1)
    return np.clip(128 + flip * (base - 128) + noise, 0, 255).round().astype(np.uint8)


def main():
    import torch
    import torch.library

    # The CPU torch here has no torchvision ops library; torchvision's fake-op registrations would
    # fail at import. The Inception model needs none of those ops.
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda f: f)
    try:
        import pytorch_fid.inception as pfi
    finally:
        torch.library.register_fake = register_fake

    torch.manual_seed(0)
    probe = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # keys/shapes only
    spec = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    sd = {k: torch.from_numpy(v) for k, v in random_state_dict(spec).items()}
    pfi.load_state_dict_from_url = lambda *a, **k: sd  # no download: pytorch-fid strict-loads our values
    model = pfi.fid_inception_v3()
    build = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: model  # so the wrapper's blocks are this model's modules (and fc)
    try:
        net = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    finally:
        pfi.fid_inception_v3 = build
    model.eval()

    spatial = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault('x', o))  # mixed_6/conv

    images = torch.from_numpy(test_images()).permute(0, 3, 1, 2).float()  # NCHW, [0, 255]
    x = (tf1_resize_bilinear(images, 299, 299) - 128) / 128
    with torch.no_grad():
        pool = net(x)[0].flatten(1)
        logits = pool @ model.fc.weight.T  # ADM's IS: the MatMul weight only
    sp = spatial['x'][:, :7].permute(0, 2, 3, 1).contiguous()  # NHWC, first 7 channels
    print('pool', pool.shape, float(pool.abs().mean()), 'spatial', sp.shape, float(sp.abs().mean()),
          'logits', float(logits.std()))

    out = {
        'pool': pool.numpy().astype(np.float32),
        'spatial': sp.numpy().astype(np.float32),
        'logits': logits.numpy().astype(np.float32),
        'state_keys': np.array(json.dumps(spec)),
    }
    out.update(legacy_sample())
    path = __file__.replace('make_inception_ref.py', 'inception_ref.npz')
    np.savez_compressed(path, **out)
    print('wrote', path)


def tf1_resize_bilinear(x, out_h: int, out_w: int):
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) on NCHW float32, after
    tensorflow/core/kernels/resize_bilinear_op.cc: weights from the legacy scaler in float32,
    interpolate along x on the top and bottom rows, then along y."""
    import torch

    def weights(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.arange(n_out, dtype=np.float32) * scale
        lower = np.floor(src).astype(np.int64)
        upper = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
        return torch.from_numpy(lower), torch.from_numpy(upper), torch.from_numpy(src - np.floor(src))

    ylo, yhi, ylerp = weights(x.shape[2], out_h)
    xlo, xhi, xlerp = weights(x.shape[3], out_w)
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * xlerp
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * xlerp
    return top + (bottom - top) * ylerp[:, None]


def legacy_sample() -> dict[str, np.ndarray]:
    """A small state dict saved in torch's legacy (non-zip) format, with the tensors it holds:
    several dtypes, a transposed (strided) tensor, two tensors sharing one storage at an offset."""
    import torch

    rng = np.random.default_rng(7)
    base = torch.from_numpy(rng.normal(size=(6, 4)).astype(np.float32))
    sd = {
        'conv.weight': torch.from_numpy(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
        'bn.num_batches_tracked': torch.tensor(5, dtype=torch.int64),
        'half': torch.from_numpy(rng.normal(size=(2, 3)).astype(np.float16)),
        'transposed': base.t(),
        'rows': base[2:5],
        'scalar': torch.tensor(3.5, dtype=torch.float64),
    }
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    out = {'legacy_pth': np.frombuffer(buf.getvalue(), np.uint8)}
    out.update({f'legacy/{k}': v.contiguous().numpy() for k, v in sd.items()})
    return out


if __name__ == '__main__':
    main()
