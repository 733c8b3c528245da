"""Class-conditional samples from a checkpoint: a labelled grid, coarse-to-fine strips, or an
ADM-format .npz of many images for FID.

    python -m var_jax.sample --checkpoint DIR --classes 207,360,387,974 --per_class 4 \\
        --cfg 4 --top_k 900 --top_p 0.95 --seed 0 --out grid.png
    python -m var_jax.sample --checkpoint DIR --classes 207,360 --progression --out strips.png
    python -m var_jax.sample --checkpoint DIR --all_classes --per_class 50 --preset official \\
        --npz samples.npz

DIR is a converted checkpoint (python -m var_jax.convert) or a training workdir (EMA weights of
its latest step unless --step); --dtype bfloat16 computes in bfloat16 (parameters stay float32).
--out writes the image format its suffix names (.png, .jpg, .webp, ...). An existing --out or
--npz file is replaced only with --force; the output path (its directory exists and is writable,
it is not a directory, the suffix is known) is checked before the model is loaded.

Sampling settings come from --preset, then from explicit flags (a flag beats the preset):

    official  cfg 1.5, top_k 900, top_p 0.96, no smoothing  VAR README FID protocol (default with --npz)
    paper     cfg 2.0, top_k 900, top_p 0.96, no smoothing  the paper's guidance (VAR issue #86)
    demo      cfg 4.0, top_k 900, top_p 0.95, no smoothing  demo_sample.ipynb (default for PNGs)

Image (class c, index i) uses the key fold_in(fold_in(key(seed), c), i): it depends on the seed,
the class and the index only, never on --batch_size or the device count, so a grid shows the
very images an .npz with the same settings holds.

--npz writes the ADM evaluator's format (openai/guided-diffusion `evaluations/evaluator.py`):
arr_0 = uint8 (N, H, W, 3), N = classes x per_class (50,000 for ImageNet with --all_classes
--per_class 50), and arr_1 = the labels, as guided-diffusion's own sampler stores them. Pixels
are round(255 x) of the [0, 1] image, what a PNG would hold. The images are stored in a seeded
random order, not sorted by class: ADM averages the Inception Score over consecutive splits of
5,000 images, so a class-sorted file would cap IS at 100 (FID does not depend on the order).
Batches are split over all devices. Finished chunks are kept in OUT.parts/ with a manifest of
the settings: re-running the same command after an interruption continues where it stopped
(other settings are refused), and the .npz is assembled atomically at the end.
"""
from __future__ import annotations

import argparse
import sys

from var_jax.sampling.files import DEMO_CLASSES, write_samples
from var_jax.sampling.settings import PRESETS, add_sampling_flags, resolve_settings
from var_jax.utils import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog='python -m var_jax.sample', description=__doc__.split('\n\n')[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--checkpoint', required=True, help='converted checkpoint or training workdir')
    p.add_argument('--step', type=int, help='training workdirs: the step to load (default: the latest)')
    what = p.add_argument_group('what to sample')
    what.add_argument('--classes', help='comma-separated class indices, e.g. 207,360,387,974 (default for PNGs: '
                                        f'{",".join(map(str, DEMO_CLASSES))} for 1000-class models, else the first '
                                        'eight classes; for --npz: all classes)')
    what.add_argument('--all_classes', action='store_true', help='every class of the model')
    what.add_argument('--per_class', type=int, help='images per class (default 4 for PNGs, 50 for --npz)')
    out = p.add_argument_group('output (one of)')
    out.add_argument('--out', help='image (PNG, or the format its suffix names: .jpg, .webp, ...): a grid, one row '
                                   'per class labelled with its index and name')
    out.add_argument('--npz', help='ADM sample batch (.npz) for FID, see below')
    out.add_argument('--progression', action='store_true',
                     help='with --out: one strip per image, the image decoded after each scale, coarse to fine')
    out.add_argument('--force', action='store_true',
                     help='overwrite an existing --out or --npz file (an interrupted run in its .parts/ continues '
                          'without it)')
    out.add_argument('--chunk_size', type=int, default=1000,
                     help='--npz: images per resumable part file (default 1000)')
    out.add_argument('--max_chunks', type=int, default=0, help=argparse.SUPPRESS)  # tests: stop early
    p.add_argument('--preset', choices=sorted(PRESETS),
                   help='sampling settings (default: official with --npz, demo for PNGs)')
    add_sampling_flags(p, '--preset')
    run = p.add_argument_group('devices')
    run.add_argument('--batch_size', type=int, default=64,
                     help='images per step over all devices, rounded up to a multiple of the device count '
                          '(default 64; lower it if memory runs out, e.g. for d36 at 512 px)')
    run.add_argument('--num_devices', type=int, help='use the first N devices (default: all)')
    return p


def _check_args(args: argparse.Namespace) -> None:
    if (args.out is None) == (args.npz is None):
        raise ValueError('give one output: --out grid.png or --npz samples.npz')
    if args.progression and args.npz:
        raise ValueError('--progression writes a PNG: use it with --out, not --npz')
    if args.npz and not args.npz.endswith('.npz'):
        raise ValueError(f'--npz must name a .npz file, got {args.npz}')
    if args.classes is not None and args.all_classes:
        raise ValueError('give --classes or --all_classes, not both')
    for name in ('per_class', 'batch_size', 'chunk_size', 'num_devices'):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f'--{name} must be >= 1, got {v}')
    if args.max_chunks < 0:
        raise ValueError('--max_chunks must be >= 0')


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    settings = resolve_settings(args, args.preset or ('official' if args.npz else 'demo'))
    write_samples(args.checkpoint, settings, out=args.out, npz=args.npz, step=args.step, classes=args.classes,
                  all_classes=args.all_classes, per_class=args.per_class, progression=args.progression,
                  seed=args.seed, batch_size=args.batch_size, num_devices=args.num_devices,
                  chunk_size=args.chunk_size, max_chunks=args.max_chunks, force=args.force, dtype=args.dtype)
    return 0


def main(argv=None) -> int:
    return cli.run(lambda: run(build_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
