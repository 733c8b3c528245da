"""Evaluate generated samples.

ADM suite (the protocol of VAR's reported numbers; see docs/evaluation.md):

    python -m var_jax.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth [--batch_size 128]

prints ADM's five lines (`Inception Score`, `FID`, `sFID`, `Precision`, `Recall`) on stdout;
progress bars and notes go to stderr.

Built-in score (a VAR trained on the built-in shapes10 data; see docs/builtin_eval.md):

    python -m var_jax.evaluate --workdir runs/tiny [--per_class 100] [--cfg 3.0] [--seed 0]

samples the workdir's VAR with and without guidance and prints a table of class accuracies and
Fréchet distances judged by a classifier trained on real shapes10 images (trained once, about a
minute, then cached); the numbers also go to `<workdir>/eval.json`.

Any bad input is one `error: ...` line on stderr and exit code 2. Inputs are checked with numpy
(or JSON) before JAX is imported, so mistakes are reported at once.
"""
from __future__ import annotations

import argparse
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
    adm.add_argument('--inception', help='pytorch-fid FID Inception weights, pt_inception-2015-12-05-6726825d.pth')
    p.add_argument('--batch_size', type=int, default=128,
                   help='images per step over all local devices (rounded up to a multiple of the device count)')
    ws = p.add_argument_group('built-in score (a VAR trained on the built-in shapes10 data)')
    ws.add_argument('--workdir', help='training workdir (or model checkpoint) of a VAR trained on shapes10')
    ws.add_argument('--per_class', type=int, default=100, help='samples per class, drawn with and without guidance')
    ws.add_argument('--cfg', type=float, default=None,
                    help="guidance scale of the guided samples (default: the workdir's sample.cfg, else 3.0)")
    ws.add_argument('--top_k', type=int, default=0, help='top-k filter when sampling (0 = off)')
    ws.add_argument('--top_p', type=float, default=0.0, help='top-p filter when sampling (0 = off)')
    ws.add_argument('--seed', type=int, default=0, help='sampling seed (keys from image_keys(seed, class, index))')
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

    results, settings = builtin_score.score(args.workdir, per_class=args.per_class, cfg=args.cfg,
                                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(builtin_score.format_results(results, settings), flush=True)
    print(f'written to {args.workdir.rstrip("/")}/{builtin_score.EVAL_FILE} ({settings["seconds"]:.0f} s)',
          flush=True)
    return 0


def select_mode(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """Which evaluation the flags ask for. New modes get a branch here."""
    adm_flags = {'--samples': args.samples, '--ref': args.ref, '--inception': args.inception}
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
    raise ValueError('nothing to evaluate: pass --workdir (built-in score) or --samples, --ref and '
                     '--inception (ADM suite)')


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return select_mode(args)(args)
    except (_UsageError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
