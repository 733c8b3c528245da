"""Class-conditional samples of a checkpoint to a file: `python -m var_jax.sample`'s library call.

Every check that needs no parameters comes first (the checkpoint's model.json, the classes, the
devices, the output path): a bad input costs no model load. Then the grid / strips image
(var_jax.sampling.grid) or the resumable ADM .npz (var_jax.sampling.npz) is written.
"""
from __future__ import annotations

from var_jax.io import outputs
from var_jax.io.checkpoint import open_checkpoint
from var_jax.sampling.batch import local_devices
from var_jax.sampling.grid import write_grid
from var_jax.sampling.npz import sample_npz
from var_jax.sampling.settings import Settings, parse_classes

DEMO_CLASSES = (980, 437, 22, 562)  # demo_sample.ipynb: volcano, beacon, bald eagle, fountain


def choose_classes(text: str | None, all_classes: bool, num_classes: int, npz: bool) -> list[int]:
    """--classes, else every class (--all_classes, or an .npz), else the demo's classes for
    1000-class models and the first eight for others."""
    if all_classes or (text is None and npz):
        return list(range(num_classes))
    if text is not None:
        return parse_classes(text, num_classes)
    return list(DEMO_CLASSES) if num_classes == 1000 else list(range(min(num_classes, 8)))


def write_samples(checkpoint: str, settings: Settings, *, out: str | None = None, npz: str | None = None,
                  step: int | None = None, classes: str | None = None, all_classes: bool = False,
                  per_class: int | None = None, progression: bool = False, seed: int = 0, batch_size: int = 64,
                  num_devices: int | None = None, chunk_size: int = 1000, max_chunks: int = 0, force: bool = False,
                  dtype: str | None = None) -> None:
    """`per_class` images (default 4 for an image, 50 for an .npz) of each class into `out` (a grid
    or, with `progression`, strips) or `npz`; `classes` is the --classes text."""
    ck = open_checkpoint(checkpoint, step)
    chosen = choose_classes(classes, all_classes, ck.num_classes, npz is not None)
    per_class = per_class or (50 if npz else 4)
    devices = local_devices(num_devices)
    if out:  # before the model is loaded: a bad path must not cost a minute of sampling
        outputs.image_format(out)
        outputs.check_file_output(out, force=force)
    if npz:
        sample_npz(ck, settings, chosen, per_class, out=npz, seed=seed, devices=devices, batch_size=batch_size,
                   chunk_size=chunk_size, max_chunks=max_chunks, force=force, dtype=dtype)
    else:
        write_grid(ck, settings, chosen, per_class, out=out, seed=seed, devices=devices, batch_size=batch_size,
                   progression=progression, dtype=dtype)
