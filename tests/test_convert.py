"""Official checkpoint conversion: file formats, the CLI round trip, and errors that name the key."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, fixture_dir
from flax import nnx

from var_jax.io import checkpoint, official
from var_jax.io.state_dict import load_state_dict


@pytest.fixture(scope='module')
def tiny_dir():
    return fixture_dir('var_tiny')


def write_safetensors(path, sd):
    header, blobs, off = {}, [], 0
    for k, v in sd.items():
        v = np.ascontiguousarray(v)
        dt = {'float32': 'F32', 'float16': 'F16', 'int64': 'I64'}[str(v.dtype)]
        header[k] = {'dtype': dt, 'shape': list(v.shape), 'data_offsets': [off, off + v.nbytes]}
        blobs.append(v.tobytes())
        off += v.nbytes
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(h)) + h + b''.join(blobs))


def test_formats_agree(tiny_dir, tmp_path):
    pth = load_state_dict(tiny_dir / 'var.pth')
    npz = load_state_dict(tiny_dir / 'var_state.npz')
    write_safetensors(tmp_path / 'var.safetensors', npz)
    st = load_state_dict(tmp_path / 'var.safetensors')
    for other in (npz, st):
        assert other.keys() == pth.keys()
        for k in pth:
            np.testing.assert_array_equal(other[k].astype(pth[k].dtype), pth[k])


def test_inferred_configs(tiny_dir):
    vq, var = official.load_official(tiny_dir / 'vae_state.npz', tiny_dir / 'var_state.npz')
    assert (var.config.depth, var.config.C, var.config.H, var.config.vocab_size) == (2, 128, 2, 512)
    assert not var.config.shared_aln and var.config.num_classes == 1000
    assert (vq.config.ch, vq.config.ch_mult, vq.config.share_quant_resi) == (32, (1, 1, 2, 2, 4), 4)


@pytest.mark.slow
def test_cli_round_trip(tiny_dir, tmp_path):
    out = tmp_path / 'ckpt'
    r = subprocess.run([sys.executable, '-m', 'var_jax.convert', '--vae', str(tiny_dir / 'vae.pth'), '--var',
                        str(tiny_dir / 'var.pth'), '--out', str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert 'VAR d2' in r.stdout
    vq, var = checkpoint.load_model(out)
    vq0, var0 = official.load_official(tiny_dir / 'vae.pth', tiny_dir / 'var.pth')
    for a, b in ((vq, vq0), (var, var0)):
        assert a.config == b.config
        jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))
    vq_only, none = checkpoint.load_model(out, tokenizer_only=True)  # the VAR weights are not read
    assert none is None
    jax.tree.map(np.testing.assert_array_equal, nnx.state(vq_only, nnx.Param), nnx.state(vq0, nnx.Param))
    # exists -> refused without --force, nothing touched
    r = subprocess.run([sys.executable, '-m', 'var_jax.convert', '--vae', str(tiny_dir / 'vae.pth'), '--out', str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'exists' in r.stderr
    assert 'Traceback' not in r.stderr


def _edited(tiny_dir, tmp_path, fn, name='var.npz'):
    sd = dict(np.load(tiny_dir / 'var_state.npz'))
    fn(sd)
    np.savez(tmp_path / name, **sd)
    return tmp_path / name


@pytest.mark.parametrize('edit,match', [
    (lambda sd: sd.pop('blocks.1.ffn.fc2.bias'), r'blocks\.1\.'),
    (lambda sd: sd.pop('head.weight'), "'head.weight'"),
    (lambda sd: sd.__setitem__('blocks.0.ffn.fc1.bias', np.zeros(7, np.float16)), "'blocks.0.ffn.fc1.bias'"),
    (lambda sd: sd.__setitem__('head.extra', np.zeros(3, np.float16)), "unexpected key 'head.extra'"),
])
def test_bad_var_state_names_the_key(tiny_dir, tmp_path, edit, match):
    path = _edited(tiny_dir, tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        official.load_official(tiny_dir / 'vae_state.npz', path)


def test_wrong_files(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match='not a VAR state dict'):
        official.load_official(tiny_dir / 'vae.pth', tiny_dir / 'vae.pth')
    with pytest.raises(ValueError, match='not a VQVAE state dict'):
        official.load_official(tiny_dir / 'var.pth', None)
    bad = tmp_path / 'broken.pth'
    bad.write_bytes((tiny_dir / 'var.pth').read_bytes()[:5000])
    with pytest.raises(ValueError, match='broken.pth'):
        load_state_dict(bad)
    with pytest.raises(ValueError, match='no such file'):
        load_state_dict(tmp_path / 'missing.pth')


def test_cli_error_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / 'never'
    r = subprocess.run([sys.executable, '-m', 'var_jax.convert', '--vae', str(tiny_dir / 'var.pth'), '--out', str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(ValueError, match='no such checkpoint'):
        checkpoint.load_model(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='model.json'):
        checkpoint.load_model(tmp_path / 'empty')
    shutil.rmtree(tmp_path / 'empty')
