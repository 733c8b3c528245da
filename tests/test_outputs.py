"""Nothing lost, nothing silently wrong: output paths (convert, save_model), non-finite weights,
damaged input files, 16-bit images, and errors that name the culprit."""
from __future__ import annotations

import os
import struct
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_VQ, fixture_dir
from PIL import Image

from var_jax import convert
from var_jax.data import images, pipeline
from var_jax.io import checkpoint, official, outputs
from var_jax.io.state_dict import load_state_dict
from var_jax.models import create


@pytest.fixture(scope='module')
def tiny_dir():
    return fixture_dir('var_tiny')


def tree(d) -> dict:
    """Every file under d with its bytes: what 'nothing deleted, nothing created' compares."""
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), 'rb').read()
            for r, _, fs in os.walk(d) for f in fs} | {os.path.relpath(r, d) + '/': b'' for r, _, _ in os.walk(d)}


def convert_cli(capsys, tiny_dir, out, *extra, var=True):
    argv = ['--vae', str(tiny_dir / 'vae.pth'), '--out', str(out), *map(str, extra)]
    if var:
        argv += ['--var', str(tiny_dir / 'var.pth')]
    rc = convert.main(argv)
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------- convert --force
@pytest.mark.parametrize('layout', ['workdir', 'user file', 'cwd', 'file', 'missing parent', 'parent is a file'])
def test_convert_force_never_deletes_data(tiny_dir, tmp_path, capsys, monkeypatch, layout):
    d = tmp_path / 'target'
    d.mkdir()
    out = d
    if layout == 'workdir':  # a training workdir: model.json + checkpoints/
        (d / 'model.json').write_text('{}')
        (d / 'checkpoints' / '100').mkdir(parents=True)
        (d / 'checkpoints' / '100' / 'x').write_bytes(b'state')
    elif layout == 'user file':  # a converted checkpoint the user put a file into
        (d / 'model.json').write_text('{}')
        (d / 'params').mkdir()
        (d / 'notes.txt').write_text('mine')
    elif layout == 'cwd':
        (d / 'train.py').write_text('print()')
        monkeypatch.chdir(d)
        out = '.'
    elif layout == 'file':
        out = d / 'weights.bin'
        out.write_bytes(b'data')
    elif layout == 'missing parent':
        out = d / 'no' / 'ckpt'
    else:
        (d / 'f').write_text('x')
        out = d / 'f' / 'ckpt'
    before = tree(tmp_path)
    rc, err = convert_cli(capsys, tiny_dir, out, '--force')
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    assert tree(tmp_path) == before, 'nothing deleted, nothing created'
    if layout == 'workdir':
        assert "'checkpoints'" in err
    if layout == 'user file':
        assert "'notes.txt'" in err


def test_convert_force_replaces_a_converted_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / 'ckpt'
    rc, err = convert_cli(capsys, tiny_dir, out, var=False)  # a tokenizer-only checkpoint
    assert rc == 0, err
    rc, err = convert_cli(capsys, tiny_dir, out)
    assert rc == 2 and 'exists' in err and '--force' in err
    rc, err = convert_cli(capsys, tiny_dir, out, '--force')
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt'], 'no temporary sibling left'
    _, var = checkpoint.load_model(out)
    assert var is not None, 'replaced by the new conversion'
    # an empty directory holds nothing to lose
    (tmp_path / 'empty').mkdir()
    assert convert_cli(capsys, tiny_dir, tmp_path / 'empty', '--force', var=False)[0] == 0


def test_replaceable_dir_rules(tmp_path):
    own = checkpoint.MODEL_ENTRIES
    d = tmp_path / 'c'
    d.mkdir()
    (d / 'model.json').write_text('{}')
    (d / 'params').mkdir()
    outputs.check_dir_output(d, force=True, own=own, what='a model checkpoint')  # its own files: fine
    (d / 'params' / 'anything').write_text('inside params/ is Orbax business')
    outputs.check_dir_output(d, force=True, own=own, what='a model checkpoint')
    (d / 'params2').mkdir()
    with pytest.raises(ValueError, match="params2"):
        outputs.check_dir_output(d, force=True, own=own, what='a model checkpoint')
    os.symlink(d, tmp_path / 'link')  # replacing a link would delete the directory behind it
    with pytest.raises(ValueError, match='symbolic link'):
        outputs.check_dir_output(tmp_path / 'link', force=True, own=own, what='a model checkpoint')


def test_save_model_refuses_foreign_directory(tmp_path):
    d = tmp_path / 'w'
    (d / 'checkpoints').mkdir(parents=True)
    with pytest.raises(ValueError, match='checkpoints'):
        checkpoint.save_model(d, vqvae=create(TINY_VQ, seed=0), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['w'] and (d / 'checkpoints').is_dir()


# ---------------------------------------------------------------------------- non-finite weights
def test_convert_refuses_non_finite(tiny_dir, tmp_path, capsys):
    sd = dict(np.load(tiny_dir / 'var_state.npz'))
    sd['head.bias'] = sd['head.bias'].copy()
    sd['head.bias'][3] = np.nan
    sd['blocks.1.ffn.fc1.weight'] = sd['blocks.1.ffn.fc1.weight'].copy()
    sd['blocks.1.ffn.fc1.weight'][0, 0] = np.inf
    np.savez(tmp_path / 'var.npz', **sd)
    with pytest.raises(ValueError, match=r"non-finite.*'blocks\.1\.ffn\.fc1\.weight', 'head\.bias'"):
        official.load_official(tiny_dir / 'vae_state.npz', tmp_path / 'var.npz')
    rc = convert.main(['--vae', str(tiny_dir / 'vae_state.npz'), '--var', str(tmp_path / 'var.npz'),
                       '--out', str(tmp_path / 'out')])
    assert rc == 2 and 'head.bias' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_load_model_refuses_non_finite(tmp_path):
    vq = create(TINY_VQ, seed=0)
    k = vq.decoder.conv_out.kernel
    k.set_value(k[...].at[0, 0, 0, 0].set(jnp.nan))
    checkpoint.save_model(tmp_path / 'c', vqvae=vq)
    with pytest.raises(ValueError, match=r'non-finite.*decoder\.conv_out\.kernel'):
        checkpoint.load_model(tmp_path / 'c')


# ---------------------------------------------------------------------------- errors that name the culprit
def test_truncated_torch_zip(tiny_dir, tmp_path):
    data = (tiny_dir / 'var.pth').read_bytes()
    assert zipfile.is_zipfile(tiny_dir / 'var.pth')
    for n in (len(data) // 2, len(data) - 10):
        bad = tmp_path / 'var.pth'
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r'var\.pth: file is truncated or damaged'):
            load_state_dict(bad)


def test_damaged_torch_zip_member(tiny_dir, tmp_path):
    """A flipped byte inside a stored tensor: the zip's CRC check names the file."""
    data = bytearray((tiny_dir / 'var.pth').read_bytes())
    with zipfile.ZipFile(tiny_dir / 'var.pth') as zf:
        info = next(i for i in zf.infolist() if '/data/' in i.filename and i.file_size > 64)
    name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the local header's extra field pads
    data[start + 8] ^= 0xFF
    (tmp_path / 'v.pth').write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r'v\.pth: file is truncated or damaged'):
        load_state_dict(tmp_path / 'v.pth')


def _var_keys(tiny_dir):
    return [k for k in np.load(tiny_dir / 'var_state.npz').files if not official.VAR_BUFFERS.match(k)]


def _vae_keys(tiny_dir):
    return [k for k in np.load(tiny_dir / 'vae_state.npz').files if k not in official.VAE_BUFFERS]


def _load_with(tiny_dir, tmp_path, which, sd):
    np.savez(tmp_path / f'{which}.npz', **sd)
    if which == 'var':
        return official.load_official(tiny_dir / 'vae_state.npz', tmp_path / 'var.npz')
    return official.load_official(tmp_path / 'vae.npz', None)


# keys that were misreported (another key named, or a numpy reshape error naming none); the
# sweeps below try every key (minutes: each try builds an abstract model)
MISSING = {'var': ['blocks.0.attn.scale_mul_1H11', 'head_nm.ada_lin.1.weight', 'blocks.1.attn.q_bias'],
           'vae': ['decoder.norm_out.weight', 'encoder.down.0.block.0.conv1.weight', 'encoder.mid.attn_1.qkv.weight',
                   'quantize.quant_resi.qresi_ls.2.weight']}
MISSHAPED = {'var': ['blocks.0.ffn.fc1.weight', 'head.weight', 'blocks.1.attn.q_bias', 'blocks.0.attn.mat_qkv.weight',
                     'blocks.1.ada_lin.1.weight'],
             'vae': ['encoder.conv_in.weight', 'decoder.conv_out.weight', 'quantize.quant_resi.qresi_ls.1.weight']}


def _check_missing(tiny_dir, tmp_path, which, keys):
    full = dict(np.load(tiny_dir / f'{which}_state.npz'))
    wrong = []
    for key in keys:
        sd = {k: v for k, v in full.items() if k != key}
        try:
            _load_with(tiny_dir, tmp_path, which, sd)
            wrong.append(f'{key}: accepted')
        except ValueError as e:
            if f"'{key}'" not in str(e):
                wrong.append(f'{key}: {e}')
    assert not wrong, f'{len(wrong)} of {len(keys)}:\n' + '\n'.join(wrong[:10])


def _check_misshaped(tiny_dir, tmp_path, which, keys):
    """One key with one more row: the error names exactly that key with both shapes."""
    full = dict(np.load(tiny_dir / f'{which}_state.npz'))
    wrong = []
    for key in keys:
        arr = full[key]
        bad = np.concatenate([arr, arr[:1]]) if arr.ndim else np.zeros((2,), arr.dtype)
        try:
            _load_with(tiny_dir, tmp_path, which, full | {key: bad})
            wrong.append(f'{key}: accepted')
        except ValueError as e:
            want = f"'{key}' has shape {tuple(bad.shape)}, expected {tuple(arr.shape)}"
            if want not in str(e):
                wrong.append(f'{key}: {e}')
    assert not wrong, f'{len(wrong)} of {len(keys)}:\n' + '\n'.join(wrong[:10])


@pytest.mark.parametrize('which', ['var', 'vae'])
def test_missing_or_misshaped_key_is_named(tiny_dir, tmp_path, which):
    _check_missing(tiny_dir, tmp_path, which, MISSING[which])
    _check_misshaped(tiny_dir, tmp_path, which, MISSHAPED[which])


def _sweep_keys(tiny_dir, which):
    # one more class or code is another valid model, not a mis-shape (a VQVAE / VAR vocabulary
    # mismatch is refused by check_pair)
    keys = _var_keys(tiny_dir) if which == 'var' else _vae_keys(tiny_dir)
    return [k for k in keys if k not in ('class_emb.weight', 'quantize.embedding.weight')]


@pytest.mark.slow
@pytest.mark.parametrize('which', ['var', 'vae'])
def test_every_missing_key_is_named(tiny_dir, tmp_path, which):
    _check_missing(tiny_dir, tmp_path, which, _var_keys(tiny_dir) if which == 'var' else _vae_keys(tiny_dir))


@pytest.mark.slow
@pytest.mark.parametrize('which', ['var', 'vae'])
def test_every_misshaped_key_is_named(tiny_dir, tmp_path, which):
    _check_misshaped(tiny_dir, tmp_path, which, _sweep_keys(tiny_dir, which))


# ---------------------------------------------------------------------------- images
def test_to_rgb8_16_bit(tmp_path):
    v16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    want = np.array([[0, 1, 128, 255]], np.uint8)
    Image.fromarray(v16).save(tmp_path / 'g16.png')  # a 16-bit greyscale PNG
    with Image.open(tmp_path / 'g16.png') as im:
        im.load()
        assert im.mode in ('I', 'I;16')
        rgb = np.asarray(images.to_rgb8(im))
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
        np.testing.assert_array_equal(rgb[..., 0], want)
        np.testing.assert_array_equal(np.asarray(images.to_l8(im)), want)
    for dtype, mode in ((np.uint16, 'I;16'), (np.int32, 'I')):
        im = Image.fromarray(v16.astype(dtype))
        assert im.mode == mode
        np.testing.assert_array_equal(np.asarray(images.to_rgb8(im))[..., 1], want)
    rgba = Image.fromarray(np.full((2, 2, 4), 7, np.uint8))
    assert images.to_rgb8(rgba).mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(pipeline.decode((tmp_path / 'g16.png').read_bytes()))[..., 2], want)


def test_output_file_rules(tmp_path, monkeypatch):
    f = tmp_path / 'a.png'
    outputs.check_file_output(f, force=False)  # new file: fine, nothing created
    assert not f.exists()
    f.write_bytes(b'x')
    with pytest.raises(ValueError, match='exists; pass --force'):
        outputs.check_file_output(f, force=False)
    outputs.check_file_output(f, force=True)
    with pytest.raises(ValueError, match='is a directory'):
        outputs.check_file_output(tmp_path, force=True)
    with pytest.raises(ValueError, match='no such directory'):
        outputs.check_file_output(tmp_path / 'no' / 'a.png', force=True)
    monkeypatch.setattr(os, 'access', lambda *a, **k: False)
    with pytest.raises(ValueError, match='not writable'):
        outputs.check_file_output(tmp_path / 'b.png', force=False)


def test_save_image_by_suffix(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name, fmt in (('a.png', 'PNG'), ('a.jpg', 'JPEG'), ('a.JPEG', 'JPEG'), ('a.webp', 'WEBP'), ('a.bmp', 'BMP')):
        outputs.save_image(tmp_path / name, x)
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt, name
    for name in ('a.xyz', 'noext', 'a.pdf'):
        with pytest.raises(ValueError, match='suffix'):
            outputs.image_format(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.JPEG', 'a.bmp', 'a.jpg', 'a.png', 'a.webp']
