"""`python -m var_jax.sample` and `python -m var_jax.edit` on a small random checkpoint.

Commands run in-process (`main(argv)`), so they share the jit cache: the sampler compiles once for
the 8-device batch, once for the 1-device batch and once for editing. The model has 3 scales and
one block, random weights drawn with numpy (no init program to compile).
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY_VAR, TINY_VQ
from flax import nnx
from PIL import Image

from var_jax import edit as edit_cli
from var_jax import sample as sample_cli
from var_jax.data import images
from var_jax.eval.inputs import NpzImages
from var_jax.io import checkpoint
from var_jax.models import abstract
from var_jax.sampling import editing, generate, settings
from var_jax.sampling.npz import file_order

PNS = (1, 2, 4)  # 8 px images
VQ, VAR_CFG = TINY_VQ.replace(patch_nums=PNS), TINY_VAR.replace(patch_nums=PNS, depth=1)
NAMES = [f'name{i}' for i in range(VAR_CFG.num_classes)]
N_DEV = len(jax.devices())


def random_model(cfg, seed: int):
    graphdef, state = nnx.split(abstract(cfg))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), state))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    checkpoint.save_model(d / 'model', vqvae=random_model(VQ, 0), var=random_model(VAR_CFG, 1))
    meta = json.loads((d / 'model' / 'model.json').read_text())
    (d / 'model' / 'model.json').write_text(json.dumps(meta | {'class_names': NAMES}))
    checkpoint.save_model(d / 'tokenizer', vqvae=random_model(VQ, 0))
    return d


@pytest.fixture(scope='module', autouse=True)
def load_once():
    """Each command loads the checkpoint; building the abstract models for that costs seconds on
    2 cores, so after the first real load the commands get clones of the loaded models."""
    real, cache = checkpoint.load_model, {}

    def load_model(path, **kw):
        key = (str(path), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = real(path, **kw)
        return tuple(None if m is None else nnx.clone(m) for m in cache[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, 'load_model', load_model)
        yield


def run(main, argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def sample(ckpt, capsys, *argv):
    rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', *argv], capsys)
    assert rc == 0, err
    return err


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert('RGB'))


def cell(grid: np.ndarray, row: int, from_right: int = 0, size: int = 64, pad: int = 2) -> np.ndarray:
    """One image of a `viz.grid` (8 px images are shown at 64 px), counted from the right so the
    label column's width does not matter."""
    y0, x1 = pad + row * (size + pad), grid.shape[1] - pad - from_right * (size + pad)
    return grid[y0:y0 + size, x1 - size:x1]


# ---------------------------------------------------------------------------- PNG outputs
@pytest.mark.slow
def test_grid_progression_and_seeds(ckpt, tmp_path, capsys):
    a, c, strips = (tmp_path / f'{n}.png' for n in ('a', 'c', 'strips'))
    args = ['--classes', '3,5', '--per_class', 2, '--batch_size', 8]
    sample(ckpt, capsys, *args, '--out', a)
    first = a.read_bytes()
    traces = generate.TRACE_COUNT['generate']
    sample(ckpt, capsys, *args, '--out', a, '--force')  # overwrites
    sample(ckpt, capsys, *args, '--out', c, '--seed', 1)
    assert generate.TRACE_COUNT['generate'] == traces, 'same batch shape must not retrace'
    assert a.read_bytes() == first, 'same seed and settings must give the same grid'
    assert not np.array_equal(png(a), png(c))
    grid = png(a)
    assert grid.shape[0] == 2 * 66 + 2  # one row per class, 8 px images shown at 64 px

    err = sample(ckpt, capsys, *args, '--out', strips, '--progression')
    assert 'wrote' in err
    prog = png(strips)
    assert prog.shape[0] == 4 * 66 + 2  # one strip per image: 3,#0 3,#1 5,#0 5,#1
    assert prog.shape[1] - grid.shape[1] == 66 + 8 * 3  # one more column, longer labels (' #0')
    for r in range(4):  # the last frame decodes every token: it is the grid's image (class r // 2, index r % 2)
        np.testing.assert_array_equal(cell(prog, r), cell(grid, r // 2, from_right=1 - r % 2))
    assert not np.array_equal(cell(prog, 0, from_right=2), cell(prog, 0)), 'the first scale is coarser'


def test_class_names_and_presets(ckpt):
    _, var_cfg, meta = checkpoint.read_model_json(ckpt / 'model')
    names = settings.class_names(meta, var_cfg.num_classes)
    assert settings.row_label(3, names) == '3 name3'
    imagenet = settings.class_names({'class_names': [f'n{i:08d}' for i in range(1000)]}, 1000)
    assert imagenet[207] == 'golden retriever' and imagenet[974] == 'geyser', 'synset ids give way to names'
    assert settings.class_names({}, 1000)[0] == 'tench' and settings.class_names({}, 7) is None
    ns = sample_cli.build_parser().parse_args(['--checkpoint', 'x', '--npz', 'x.npz', '--preset', 'paper',
                                              '--top_p', '0.5'])
    s = settings.resolve_settings(ns, ns.preset)
    assert (s.cfg, s.top_k, s.top_p, s.more_smooth) == (2.0, 900, 0.5, False), 'a flag beats the preset'
    assert settings.PRESETS['official'] == dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        sample_cli.main(['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for text in ('official', 'paper', 'random order', 'arr_0', '--more_smooth', '5,000'):
        assert text in out


# ---------------------------------------------------------------------------- FID batches
@pytest.fixture(scope='module')
def reference_npz(ckpt, tmp_path_factory):
    """20 images (10 classes x 2) sampled on all devices, batch 8 (3 batches, the last padded)."""
    out = tmp_path_factory.mktemp('npz') / 'ref.npz'
    assert sample_cli.main(['--checkpoint', str(ckpt / 'model'), '--per_class', '2', '--batch_size', '8',
                            '--chunk_size', '6', '--npz', str(out)]) == 0
    return out


def test_npz_format_and_order(ckpt, reference_npz, tmp_path, capsys):
    with np.load(reference_npz) as f:
        assert sorted(f.files) == ['arr_0', 'arr_1']
        x, labels = f['arr_0'], f['arr_1']
    assert x.dtype == np.uint8 and x.shape == (20, 8, 8, 3)
    assert np.bincount(labels).tolist() == [2] * 10, 'all classes by default, per_class each'
    assert labels.tolist() != sorted(labels.tolist()), 'stored in shuffled, not class-sorted, order'
    np.testing.assert_array_equal(labels, file_order(range(10), 2, 0)[0])
    assert not (reference_npz.parent / 'ref.npz.parts').exists()
    assert len(NpzImages(reference_npz)) == 20  # what var_jax.evaluate reads

    grid_png = tmp_path / 'grid.png'  # the same (class, index) gives the same image in a grid
    sample(ckpt, capsys, '--classes', 7, '--per_class', 2, '--preset', 'official', '--batch_size', 8, '--out', grid_png)
    grid, labels, index = png(grid_png), *file_order(range(10), 2, 0)
    for i in range(2):
        np.testing.assert_array_equal(cell(grid, 0, from_right=1 - i)[::8, ::8], x[(labels == 7) & (index == i)][0])


@pytest.mark.slow
def test_npz_independent_of_batch_and_devices(ckpt, reference_npz, tmp_path, capsys):
    out = tmp_path / 'one_device.npz'
    sample(ckpt, capsys, '--all_classes', '--per_class', 2, '--npz', out, '--num_devices', 1, '--batch_size', 3,
           '--chunk_size', 7)
    with np.load(out) as a, np.load(reference_npz) as b:
        assert N_DEV == 8
        np.testing.assert_array_equal(a['arr_0'], b['arr_0'])  # 1 device, batch 3 == 8 devices, batch 8
        np.testing.assert_array_equal(a['arr_1'], b['arr_1'])


def test_npz_resume(ckpt, reference_npz, tmp_path, capsys):
    out = tmp_path / 's.npz'
    parts = tmp_path / 's.npz.parts'
    args = ['--per_class', 2, '--batch_size', 8, '--chunk_size', 6, '--npz', out]
    err = sample(ckpt, capsys, *args, '--max_chunks', 2)  # an interrupted run: 2 of 4 chunks written
    assert 'stopped after 2' in err and not out.exists()
    assert sorted(p.name for p in parts.iterdir()) == ['manifest.json', 'part_00000.npy', 'part_00001.npy']
    before = {p.name: p.read_bytes() for p in parts.iterdir()}

    rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', *args, '--cfg', 2], capsys)
    assert rc == 2 and err.startswith('error: ') and 'other settings' in err and 'cfg' in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before, 'a refused resume touches nothing'

    err = sample(ckpt, capsys, *args)
    assert 'resuming: 2/4 chunks (12 images)' in err
    assert not parts.exists()
    with np.load(out) as a, np.load(reference_npz) as b:
        np.testing.assert_array_equal(a['arr_0'], b['arr_0'])

    rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', *args], capsys)
    assert rc == 2 and 'exists' in err and '--force' in err


# ---------------------------------------------------------------------------- zero-shot editing
def _edit_inputs(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / 'in.png')
    mask = np.zeros((10, 12), np.uint8)
    mask[1:6, 2:8] = 255
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    return tmp_path / 'in.png', tmp_path / 'mask.png'


@pytest.mark.slow
def test_edit_keeps_unmasked_tokens(ckpt, tmp_path, capsys):
    image, mask = _edit_inputs(tmp_path)
    for mode, extra in (('inpaint', []), ('edit', ['--class', 4]), ('outpaint', [])):
        out = tmp_path / f'{mode}.png'
        rc, err = run(edit_cli.main, ['--checkpoint', ckpt / 'model', '--image', image, '--mask', mask, '--mode', mode,
                                      '--out', out, *extra], capsys)
        assert rc == 0, err
        assert png(out).shape == (8, 8, 3) and mode in err

    # the library call the command makes: unmasked tokens are the input's at every scale
    vqvae, var = checkpoint.load_model(ckpt / 'model', need_var=True)
    rgb, m = images.load_image_and_mask(str(image), str(mask), 8)
    assert m.shape == (8, 8) and 0 < m.mean() < 1 and rgb.shape == (8, 8, 3)
    want = vqvae.img_to_idx(jnp.asarray(rgb[None]) * 2 - 1)
    key = jax.random.key(0)
    for name, (out, idx, free) in {
        'inpaint': editing.inpaint(var, vqvae, rgb[None], m, key, more_smooth=True),
        'class_edit': editing.class_edit(var, vqvae, rgb[None], m, 4, key, more_smooth=True),
        'outpaint': editing.outpaint(var, vqvae, rgb[None], m, key, more_smooth=True),
    }.items():
        assert out.shape == (1, 8, 8, 3)
        assert not free[0].any(), 'the 1x1 scale is always kept'
        assert free[-1].any() and not free[-1].all(), name
        for si, (got, ref, f) in enumerate(zip(idx, want, free)):
            np.testing.assert_array_equal(np.asarray(got)[~f], np.asarray(ref)[~f], err_msg=f'{name}, scale {si}')

    aligned = np.zeros((8, 8))
    aligned[0:4, 2:6] = 1  # whole last-scale tokens: no half-covered token
    free_in = editing.inpaint(var, vqvae, rgb[None], aligned, key, more_smooth=True)[2]
    free_out = editing.outpaint(var, vqvae, rgb[None], aligned, key, more_smooth=True)[2]
    assert np.array_equal(free_in[-1], ~free_out[-1]), 'outpaint generates what inpaint keeps'
    assert free_in[-1].sum() == 4


# ---------------------------------------------------------------------------- bad input
def _no_files(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize('argv,match', [
    (['--classes', '3,10'], 'unknown class 10'),
    (['--classes', '3,x'], 'comma-separated'),
    (['--cfg', '-1'], '--cfg'),
    (['--top_p', '-0.1'], '--top_p'),
    (['--top_p', '1.5'], '--top_p'),
    (['--top_k', '-1'], '--top_k'),
    (['--per_class', '0'], '--per_class'),
    (['--checkpoint', 'MISSING'], 'no such checkpoint'),
    (['--checkpoint', 'TOKENIZER'], 'tokenizer only'),
])
def test_sample_bad_input(ckpt, tmp_path, capsys, argv, match):
    argv = [str(ckpt / 'nowhere') if a == 'MISSING' else str(ckpt / 'tokenizer') if a == 'TOKENIZER' else a
            for a in argv]
    for out in (['--out', str(tmp_path / 'g.png')], ['--npz', str(tmp_path / 's.npz')]):
        rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', *out, *argv], capsys)
        assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and match in err, err
        assert _no_files(tmp_path) == []


@pytest.mark.parametrize('case,match', [
    ('unreadable image', 'cannot read the image'), ('unreadable mask', 'cannot read the mask'),
    ('mask size', 'same size'), ('unknown class', 'unknown class 10'), ('edit without class', 'needs --class'),
    ('missing checkpoint', 'no such checkpoint'), ('no VAR', 'tokenizer only'), ('top_p', '--top_p'),
])
def test_edit_bad_input(ckpt, tmp_path, capsys, case, match):
    image, mask = _edit_inputs(tmp_path)
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    Image.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / 'small_mask.png')
    args = {'--checkpoint': ckpt / 'model', '--image': image, '--mask': mask, '--out': tmp_path / 'out' / 'e.png'}
    extra = []
    if case == 'unreadable image':
        args['--image'] = tmp_path / 'broken.png'
    elif case == 'unreadable mask':
        args['--mask'] = tmp_path / 'missing.png'
    elif case == 'mask size':
        args['--mask'] = tmp_path / 'small_mask.png'
    elif case == 'unknown class':
        extra = ['--class', 10]
    elif case == 'edit without class':
        extra = ['--mode', 'edit']
    elif case == 'missing checkpoint':
        args['--checkpoint'] = ckpt / 'nowhere'
    elif case == 'no VAR':
        args['--checkpoint'] = ckpt / 'tokenizer'
    else:
        extra = ['--top_p', 1.5]
    rc, err = run(edit_cli.main, [x for kv in args.items() for x in kv] + extra, capsys)
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and match in err, err
    assert not (tmp_path / 'out').exists()


@pytest.fixture
def loads(monkeypatch):
    """The keyword arguments of every checkpoint.load_model call (wrapping the module's cache)."""
    calls, inner = [], checkpoint.load_model

    def load_model(path, **kw):
        calls.append(kw)
        return inner(path, **kw)

    monkeypatch.setattr(checkpoint, 'load_model', load_model)
    return calls


@pytest.mark.parametrize('case,match', [
    ('exists', 'exists; pass --force'), ('directory', 'is a directory'), ('no parent', 'no such directory'),
    ('parent is a file', 'not a directory'), ('suffix', 'unknown image suffix'), ('npz exists', 'exists; pass --force'),
    ('npz directory', 'is a directory'), ('npz no parent', 'no such directory'),
])
@pytest.mark.parametrize('tool', ['sample', 'edit'])
def test_outputs_checked_before_loading(ckpt, tmp_path, capsys, loads, tool, case, match):
    """One rule for every output: a bad --out / --npz is one error line, before any model is loaded."""
    if tool == 'edit' and case.startswith('npz'):
        pytest.skip('edit writes no .npz')
    image, mask = _edit_inputs(tmp_path)
    (tmp_path / 'taken.png').write_bytes(b'old')
    (tmp_path / 'taken.npz').write_bytes(b'old')
    (tmp_path / 'dir.png').mkdir()
    (tmp_path / 'dir.npz').mkdir()
    out = {'exists': 'taken.png', 'directory': 'dir.png', 'no parent': 'no/g.png',
           'parent is a file': 'taken.png/g.png', 'suffix': 'g.xyz', 'npz exists': 'taken.npz',
           'npz directory': 'dir.npz', 'npz no parent': 'no/s.npz'}[case]
    flag = '--npz' if case.startswith('npz') else '--out'
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    if tool == 'sample':
        argv = ['--checkpoint', ckpt / 'model', '--classes', 1, '--per_class', 1, flag, tmp_path / out]
        rc, err = run(sample_cli.main, argv, capsys)
    else:
        argv = ['--checkpoint', ckpt / 'model', '--image', image, '--mask', mask, '--out', tmp_path / out]
        rc, err = run(edit_cli.main, argv, capsys)
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and match in err, err
    assert loads == [], 'checked before loading the model'
    assert sorted(str(p) for p in tmp_path.rglob('*')) == before and (tmp_path / 'taken.png').read_bytes() == b'old'


@pytest.mark.slow
def test_output_format_force_top_p_0_and_dtype(ckpt, tmp_path, capsys, loads):
    """--out x.jpg writes JPEG; --force replaces; --top_p 0 means off (as in the library and the
    configs); --dtype sets the compute dtype of both models, parameters stay float32."""
    image, mask = _edit_inputs(tmp_path)
    jpg = tmp_path / 'g.jpg'
    args = ['--classes', '3', '--per_class', 2, '--batch_size', 8, '--top_p', 0, '--out', jpg]
    sample(ckpt, capsys, *args)
    assert jpg.read_bytes()[:3] == b'\xff\xd8\xff' and Image.open(jpg).format == 'JPEG'
    assert settings.check_settings(1.5, 900, 0, False).top_p == 0
    rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', *args], capsys)
    assert rc == 2 and 'exists' in err
    jpg.write_bytes(b'old')
    sample(ckpt, capsys, *args, '--force')
    assert Image.open(jpg).format == 'JPEG'
    edited = tmp_path / 'e.webp'
    for _ in range(2):
        rc, err = run(edit_cli.main, ['--checkpoint', ckpt / 'model', '--image', image, '--mask', mask,
                                      '--out', edited, '--force', '--top_p', 0], capsys)
        assert rc == 0, err
    assert Image.open(edited).format == 'WEBP'
    assert all(kw.get('dtype') is None for kw in loads)

    ck = checkpoint.open_checkpoint(str(ckpt / 'model'))
    vq, var = ck.load(dtype='bfloat16')
    assert vq.config.dtype == var.config.dtype == 'bfloat16'
    assert {x.dtype for x in jax.tree.leaves(nnx.state(var, nnx.Param))} == {jnp.dtype('float32')}
    loads.clear()
    sample(ckpt, capsys, '--classes', '3', '--per_class', 2, '--batch_size', 8, '--dtype', 'bfloat16',
           '--out', tmp_path / 'bf16.png')
    assert loads and all(kw.get('dtype') == 'bfloat16' for kw in loads)
    assert png(tmp_path / 'bf16.png').shape[0] == 66 + 2
    rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', '--dtype', 'float8', '--out', tmp_path / 'x.png'],
                  capsys)
    assert rc == 2 and '--dtype' in err


def test_edit_reads_16_bit_images(tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits, not clipped to white (image and mask alike)."""
    v = np.full((8, 8), 32896, np.uint16)  # 128 / 255 in 16 bits
    Image.fromarray(v).save(tmp_path / 'grey16.png')
    m = np.zeros((8, 8), np.uint16)
    m[:4] = 65535
    Image.fromarray(m).save(tmp_path / 'mask16.png')
    rgb, mask = images.load_image_and_mask(str(tmp_path / 'grey16.png'), str(tmp_path / 'mask16.png'), 8)
    np.testing.assert_allclose(rgb, 128 / 255, atol=1e-6)
    np.testing.assert_array_equal(mask, (m > 0).astype(np.float64))


def test_damaged_npz_part_is_named(ckpt, tmp_path, capsys):
    out = tmp_path / 's.npz'
    args = ['--classes', '1,2', '--per_class', 2, '--batch_size', 8, '--chunk_size', 2, '--npz', out]
    sample(ckpt, capsys, *args, '--max_chunks', 1)
    part = tmp_path / 's.npz.parts' / 'part_00000.npy'
    part.write_bytes(part.read_bytes()[:-20])  # truncated, e.g. by a full disk
    rc, err = run(sample_cli.main, ['--checkpoint', ckpt / 'model', *args], capsys)
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and str(part) in err, err


def test_module_entry_point(tmp_path):
    """The real `python -m` path: one `error:` line and exit code 2, nothing written."""
    p = subprocess.run([sys.executable, '-m', 'var_jax.sample', '--checkpoint', str(tmp_path / 'none'),
                        '--out', str(tmp_path / 'g.png')], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith('error: ') and p.stderr.count('\n') == 1, p.stderr
    assert _no_files(tmp_path) == []
