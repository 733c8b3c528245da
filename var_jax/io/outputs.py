"""Output paths of the command-line tools: one rule for every file or directory they write.

    existing output      refused unless --force (PNG/JPEG images, .npz sample batches, converted
                         checkpoints alike)
    --force on a file    replaces that file; never a directory
    --force on a dir     replaces it only if it holds nothing but the files its writer makes (a
                         converted checkpoint: model.json and params/), so a training workdir, the
                         current directory or a folder with a user's file in it is never deleted
    parent directory     must exist and be writable; checked before any model is loaded, so a bad
                         path costs no minute of sampling

Writes are atomic: a file is written to a temporary sibling and renamed over the target; a
directory is built as a temporary sibling, the old one is moved aside, the new one renamed into
place, and only then is the old one removed. An interruption leaves either the old or the new
output under the final name (or, between the two renames, the old one beside it), never a half.
Images are written in the format their suffix names (PIL's registry): `x.jpg` gets JPEG bytes.
"""
from __future__ import annotations

import io
import os
import shutil
import uuid

import numpy as np
from etils import epath
from PIL import Image


def _path(path) -> epath.Path:
    """Absolute local paths (so '.' has a name and a parent); URLs such as gs://... unchanged."""
    return epath.Path(path) if '://' in str(path) else epath.Path(os.path.abspath(os.fspath(path)))


def _check_parent(path: epath.Path, flag: str) -> None:
    if '://' in str(path):  # object stores have no directories to check
        return
    parent = path.parent
    if not parent.exists():
        raise ValueError(f'{flag} {path}: no such directory {parent}')
    if not parent.is_dir():
        raise ValueError(f'{flag} {path}: {parent} is not a directory')
    if not os.access(os.fspath(parent), os.W_OK | os.X_OK):
        raise ValueError(f'{flag} {path}: directory {parent} is not writable')


def check_file_output(path, *, force: bool, flag: str = '--out') -> epath.Path:
    """May a file be written at `path`? Raises a one-line ValueError if not; creates nothing."""
    path = _path(path)
    if path.is_dir():
        raise ValueError(f'{flag} {path} is a directory; name a file')
    _check_parent(path, flag)
    if path.exists() and not force:
        raise ValueError(f'{path} exists; pass --force to overwrite it')
    return path


def check_dir_output(path, *, force: bool, own: frozenset[str], what: str, flag: str = '--out') -> epath.Path:
    """May the directory `path` be (re)written by a writer whose directories hold the entries `own`?

    A missing or empty directory is always fine; an existing one needs `force`, and then holds
    nothing but `own` entries, else the error names the others: nothing else is ever replaced."""
    path = _path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f'{flag} {path} is a file, not {what} (a directory)')
    _check_parent(path, flag)
    if '://' not in str(path):
        cwd = os.path.abspath(os.getcwd())
        if cwd == os.fspath(path) or cwd.startswith(os.fspath(path).rstrip(os.sep) + os.sep):
            raise ValueError(f'{flag} {path} is the current directory or one above it; name a new directory')
    if not path.exists():
        return path
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    if not force:
        raise ValueError(f'{path} exists; pass --force to overwrite it')
    if '://' not in str(path) and os.path.islink(os.fspath(path)):
        raise ValueError(f'{flag} {path} is a symbolic link; name the directory it points to')
    foreign = [e for e in entries if e not in own]
    if foreign:
        shown = ', '.join(map(repr, foreign[:5])) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        raise ValueError(f'{path} is not {what} (it holds {shown}); --force only replaces {what} '
                         f'({", ".join(sorted(own))}), so nothing was touched: choose another {flag}')
    return path


def temp_sibling(path: epath.Path, tag: str = 'tmp') -> epath.Path:
    return path.parent / f'.{path.name}.{tag}-{uuid.uuid4().hex[:8]}'


def replace_dir(new: epath.Path, path: epath.Path) -> None:
    """Put the finished directory `new` at `path`; an existing `path` is removed only afterwards."""
    old = None
    if path.exists():
        old = temp_sibling(path, 'old')
        path.rename(old)
    new.rename(path)
    if old is not None:
        shutil.rmtree(os.fspath(old)) if '://' not in str(old) else old.rmtree()


def write_file(path, data: bytes) -> None:
    """Atomic: a temporary sibling renamed over `path`."""
    path = _path(path)
    tmp = temp_sibling(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------- images
def image_format(path, flag: str = '--out') -> str:
    """The PIL format that `path`'s suffix names (.png, .jpg, .webp, ...); other suffixes are refused."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE or fmt in ('PDF', 'EPS', 'PALM', 'XBM', 'MPO'):
        known = ', '.join(('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif'))
        raise ValueError(f'{flag} {path}: unknown image suffix {ext or "(none)"!r}; use one of {known}')
    return fmt


def save_image(path, image: np.ndarray) -> None:
    """uint8 (H, W, 3) or float [0, 1] -> an image file in the format of the suffix, atomically."""
    from var_jax.utils import viz  # noqa: PLC0415

    fmt = image_format(path)
    buf = io.BytesIO()
    Image.fromarray(viz.to_uint8(image)).save(buf, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    write_file(path, buf.getvalue())
