"""Read flat PyTorch-style state dicts into numpy, without needing torch.

Supported: `.pth`/`.pt`/`.bin` written by `torch.save(state_dict)`, in the zip format of torch >= 1.6 or the
legacy format (`state_dict_legacy`), read with restricted unpicklers that only build tensors and
dicts, so a checkpoint cannot run code; `.npz`; and `.safetensors`. Every failure is a
`ValueError` naming the file and the problem.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from var_jax.io import state_dict_legacy
from var_jax.io.state_dict_legacy import STORAGE_DTYPES

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_args):
    if not size:
        return np.array(storage[offset])
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *_args):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, fh, zf: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(fh)
        self._zf, self._prefix, self._path = zf, prefix, path

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return _rebuild_tensor
        if (module, name) == ('torch._utils', '_rebuild_parameter'):
            return _rebuild_parameter
        if module == 'torch' and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(f'{self._path}: holds a {module}.{name} object; expected a plain state dict of '
                         'tensors (as torch.save(model.state_dict()) writes)')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
            raise ValueError(f'{self._path}: unsupported storage record {pid!r}')
        _, storage_type, key, _location, _numel = pid
        raw = self._zf.read(f'{self._prefix}data/{key}')
        return np.frombuffer(raw, dtype=storage_type.dtype)


def _read_torch_zip(path: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith('data.pkl')]
        if len(pkl) != 1:
            raise ValueError(f'{path}: not a torch.save archive (no single data.pkl inside)')
        prefix = pkl[0][: -len('data.pkl')]
        with zf.open(pkl[0]) as fh:
            obj = _StateDictUnpickler(fh, zf, prefix, path).load()
    return obj


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, 'rb') as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f'{path}: truncated safetensors file')
        (n,) = struct.unpack('<Q', head)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f'{path}: corrupt safetensors header') from None
        data = fh.read()
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        if info['dtype'] not in _SAFETENSORS_DTYPES:
            raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
        b, e = info['data_offsets']
        if e > len(data):
            raise ValueError(f'{path}: truncated safetensors file (tensor {name!r})')
        arr = np.frombuffer(data[b:e], dtype=_SAFETENSORS_DTYPES[info['dtype']])
        out[name] = arr.reshape(info['shape']).copy()
    return out


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """Accept a flat state dict, or one nested under 'state_dict' / 'model' / 'module'."""
    if isinstance(obj, dict):
        for key in ('state_dict', 'model', 'module'):
            if key in obj and isinstance(obj[key], dict) and len(obj) == 1:
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f'{path}: expected a flat state dict of tensors')
    out = {}
    for k, v in obj.items():
        for pre in ('module.', '_orig_mod.'):  # DDP / torch.compile wrappers
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def _starts_like_zip(path: str) -> bool:
    with open(path, 'rb') as fh:
        return fh.read(4) == b'PK\x03\x04'  # a zip local file header


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict file into {official key: numpy array} (dtypes as stored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file')
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == '.npz':
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        elif ext == '.safetensors':
            obj = _read_safetensors(path)
        elif zipfile.is_zipfile(path):
            obj = _read_torch_zip(path)
        elif _starts_like_zip(path):  # a torch zip whose end (the central directory) is missing
            raise ValueError(f'{path}: file is truncated or damaged (a zip archive without its central '
                             'directory: was the download or copy cut short?)')
        elif state_dict_legacy.is_legacy_torch_file(path):
            obj = state_dict_legacy.load_legacy_state_dict(path)
        else:
            raise ValueError(f'{path}: unknown state dict format (expected .pth, .npz or .safetensors)')
    except ValueError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # CRC mismatch, short member: damaged bytes
        raise ValueError(f'{path}: file is truncated or damaged ({type(e).__name__}: {e})') from None
    except (OSError, KeyError, pickle.UnpicklingError, struct.error) as e:
        raise ValueError(f'{path}: cannot read state dict ({type(e).__name__}: {e})') from None
    return _unwrap(obj, path)
