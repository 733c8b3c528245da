"""Torch-free reader for the legacy (pre-1.6, non-zip) `torch.save` format.

pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (and any checkpoint saved with
`_use_new_zipfile_serialization=False`) predates torch's zip format; `var_jax.io.state_dict` reads
those files through this module, which imports nothing of var_jax (one way, no import circle;
the storage dtype table lives here). The format is a run of pickles followed by raw storages:

    magic number, protocol version (1001), sys_info {'little_endian': ...},
    the state dict (tensors point at storages through persistent ids
        ('storage', StorageType, key, location, numel, view_metadata)),
    the sorted list of storage keys,
    then for each key: int64 element count + the storage's bytes (little endian).

Tensors can only be built after the storages behind them are read, so the state dict is first
unpickled with placeholders and filled in at the end. Like `var_jax.io.state_dict`, the unpickler
only builds tensors and dicts, so a file cannot run code. Every failure is a `ValueError`.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct

import ml_dtypes
import numpy as np

# torch storage classes -> numpy dtypes; the zip format names the same classes (var_jax.io.state_dict)
STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
PROTOCOL_VERSION = 1001


class _Storage:
    """One storage, read after the pickles; views share the root's buffer."""

    def __init__(self, dtype, numel: int):
        self.dtype, self.numel, self.data = np.dtype(dtype), numel, None
        self.root = self


class _StorageView:
    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root, self.offset, self.numel = root, offset, numel

    @property
    def dtype(self):
        return self.root.dtype

    @property
    def data(self):
        return self.root.data[self.offset:self.offset + self.numel]


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        buf = self.storage.data
        if not self.size:
            return np.array(buf[self.offset])
        view = np.lib.stride_tricks.as_strided(buf[self.offset:], shape=self.size,
                                               strides=tuple(s * buf.itemsize for s in self.stride))
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, offset, size, stride, *_args):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_args):
    return data


class _StorageClass:
    def __init__(self, name):
        self.dtype = STORAGE_DTYPES[name]


class _PlainUnpickler(pickle.Unpickler):
    """For the header pickles: plain Python values only."""

    def find_class(self, module, name):
        raise ValueError(f'unexpected {module}.{name} object in a torch file header')


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, path):
        super().__init__(fh)
        self.path, self.storages = path, {}

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
            return _rebuild_tensor
        if (module, name) == ('torch._utils', '_rebuild_parameter'):
            return _rebuild_parameter
        if module == 'torch' and name.endswith('Storage'):
            return _StorageClass(name)
        raise ValueError(f'{self.path}: holds a {module}.{name} object; expected a plain state dict of tensors')

    def persistent_load(self, pid):
        kind = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
        if kind != 'storage' or len(pid) != 6:
            raise ValueError(f'{self.path}: unsupported storage record {pid!r}')
        _, storage_class, key, _location, numel, view = pid
        key = key.decode('ascii') if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_class.dtype, int(numel))
        root = self.storages[key]
        if view is None:
            return root
        _view_key, offset, view_numel = view
        return _StorageView(root, int(offset), int(view_numel))


def _read_exact(fh, n: int, path: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ValueError(f'{path}: truncated torch file')
    return data


# LONG1 opcode with 10 bytes: MAGIC_NUMBER, little endian
_MAGIC_PICKLE = b'\x8a\x0a' + MAGIC_NUMBER.to_bytes(10, 'little')


def is_legacy_torch_file(path: str | os.PathLike) -> bool:
    """True for the pre-1.6 format: the file opens with the pickled magic number (PROTO opcode,
    protocol byte, a FRAME header from protocol 4 on, then the LONG1)."""
    with open(path, 'rb') as fh:
        head = fh.read(32)
    if head[:1] != b'\x80':
        return False
    pos = 11 if head[2:3] == b'\x95' else 2
    return head[pos:pos + len(_MAGIC_PICKLE)] == _MAGIC_PICKLE


def load_legacy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a legacy `torch.save(state_dict)` file into {key: numpy array} (dtypes as stored)."""
    path = os.fspath(path)
    try:
        with open(path, 'rb') as fh:
            if _PlainUnpickler(fh).load() != MAGIC_NUMBER:
                raise ValueError(f'{path}: not a torch file (bad magic number)')
            if _PlainUnpickler(fh).load() != PROTOCOL_VERSION:
                raise ValueError(f'{path}: unsupported legacy torch protocol version')
            sys_info = _PlainUnpickler(fh).load()
            if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
                raise ValueError(f'{path}: big-endian torch files are not supported')
            unpickler = _Unpickler(fh, path)
            obj = unpickler.load()
            keys = _PlainUnpickler(fh).load()
            for key in keys:
                key = key.decode('ascii') if isinstance(key, bytes) else str(key)
                if key not in unpickler.storages:
                    raise ValueError(f'{path}: storage {key!r} is not referenced by any tensor')
                st = unpickler.storages[key]
                (numel,) = struct.unpack('<q', _read_exact(fh, 8, path))
                if numel != st.numel:
                    raise ValueError(f'{path}: storage {key!r} holds {numel} elements, expected {st.numel}')
                st.data = np.frombuffer(_read_exact(fh, numel * st.dtype.itemsize, path), dtype=st.dtype)
    except ValueError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, struct.error, TypeError, IndexError,
            AttributeError, io.UnsupportedOperation) as e:
        raise ValueError(f'{path}: cannot read legacy torch file ({type(e).__name__}: {e})') from None
    if not isinstance(obj, dict):
        raise ValueError(f'{path}: expected a state dict, found {type(obj).__name__}')
    out = {}
    for k, v in obj.items():
        if not isinstance(v, _Tensor):
            raise ValueError(f'{path}: entry {k!r} is not a tensor')
        if v.storage.root.data is None:
            raise ValueError(f'{path}: storage of {k!r} is missing from the file')
        out[k] = v.materialize()
    return out
