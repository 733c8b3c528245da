"""Shared test setup: 8 fake CPU devices, the official parity fixtures, tiny models.

Compile time dominates on a 2-core CPU, so models are tiny and built once per session.
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# Compilation dominates the suite on a 2-core CPU, and many tests (and the subprocesses of the CLI
# and resume tests, which inherit this environment) compile the same programs: share them through
# JAX's persistent cache, in a directory that lives only as long as this session.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _jit_cache = tempfile.mkdtemp(prefix='var_jax_test_jit_cache_')
    atexit.register(shutil.rmtree, _jit_cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_jit_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')

import jax

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from var_jax.io import checkpoint  # noqa: E402
from var_jax.io.official import load_official  # noqa: E402
from var_jax.models import VQVAEConfig, create  # noqa: E402
from var_jax.testing import TINY_PNS, TINY_VAR, TINY_VQ  # noqa: E402, F401  (tests import them from here)

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get('VAR_JAX_FIXTURES', REPO.parent / 'shared' / 'fixtures'))
FIXTURE_NAMES = ('var_tiny', 'var_tiny_saln')


def no_jit_cache(env) -> dict:
    """`env` without the session's persistent compilation cache. The ranks of a multi-process run
    sharing one cache directory aborted once in the suite (SIGABRT after a long stall; not
    reproduced alone), so the multi-process test compiles from scratch."""
    return {k: v for k, v in env.items() if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_PERSISTENT_CACHE'))}


def fixture_dir(name: str) -> pathlib.Path:
    d = FIXTURES / name
    if not (d / 'expected.npz').exists():
        msg = f'parity fixtures not found at {d} (set VAR_JAX_FIXTURES)'
        if os.environ.get('CI'):
            pytest.fail(msg + ': CI must run the parity tests')
        pytest.skip(msg)
    return d


class Fixture:
    """One official reference fixture: converted models, expected outputs, tolerances."""

    def __init__(self, name: str):
        self.name = name
        self.dir = fixture_dir(name)
        self.vqvae, self.var = load_official(self.dir / 'vae.pth', self.dir / 'var.pth')
        self.expected = dict(np.load(self.dir / 'expected.npz'))
        meta = json.loads((self.dir / 'meta.json').read_text())
        self.atol = meta['tolerances']['suggested_atol_for_fp32_port']


_CACHE: dict[str, Fixture] = {}


@pytest.fixture(scope='session', params=FIXTURE_NAMES)
def official(request) -> Fixture:
    if request.param not in _CACHE:
        _CACHE[request.param] = Fixture(request.param)
    return _CACHE[request.param]


# Tiny models (var_jax.testing): 8x8 images, 4 scales, for tests of behaviour rather than numbers.


@pytest.fixture(scope='session')
def tiny_vqvae():
    return create(TINY_VQ, seed=0)


@pytest.fixture(scope='session')
def tiny_var():
    return create(TINY_VAR, seed=1)


def override(config, **dotted):
    """Set `config` fields by dotted name (`override(c, **{'optim.lr': 1e-3})`); returns config."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def prepare_tiny_tfds(data_dir: pathlib.Path) -> pathlib.Path:
    """The `var_jax_tiny` TFDS dataset (tests/data/make_tiny_tfds.py), prepared in a subprocess so
    that the test process reads it without its builder class, like a dataset prepared elsewhere."""
    r = subprocess.run([sys.executable, str(REPO / 'tests' / 'data' / 'make_tiny_tfds.py'), str(data_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return data_dir


# The tiny tokenizer the VAR training tests share (16 px, scales 1, 2, 4), saved once per module.
TOK = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8,
                  using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 4))


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('tok') / 'ckpt'
    checkpoint.save_model(d, vqvae=create(TOK, seed=3))
    return d
