"""Zero-shot in-painting, out-painting and class-conditional editing of one image (var_jax.sampling.editing).

    python -m var_jax.edit --checkpoint DIR --image in.png --mask mask.png --class 207 --out out.png \\
        [--mode inpaint|outpaint|edit] [--cfg 3 --top_k 900 --top_p 0.95 --seed 0 --more_smooth]

The image is fitted to the model's resolution S: the largest centred square is cropped and
resized to S x S (Lanczos); the mask, which must have the image's size, gets the same crop and a
box-filter resize, so a mask pixel keeps its place on the image. White mask pixels (grey = partly)
mark the region the mode is about:

    inpaint   (default)  white = the hole to fill; unconditional unless --class is given
    outpaint             white = the content to keep; everything else is generated;
                         unconditional unless --class is given
    edit                 white = the region to redraw as --class (required)

Outside the generated region the input's tokens are forced at every scale; see var_jax.sampling.editing for
how the mask becomes a token mask per scale. Sampling defaults follow the call in the official
demo_zero_shot_edit.ipynb: cfg 3, top_k 900, top_p 0.95, with --more_smooth. The output is the
edited S x S image, in the format --out's suffix names (.png, .jpg, ...); an existing file is
replaced only with --force. 16-bit images and masks are scaled to 8 bits (var_jax.data.images).
"""
from __future__ import annotations

import argparse
import sys

from var_jax.sampling.editing import MODES, edit_file
from var_jax.sampling.settings import EDIT_DEMO, add_sampling_flags, resolve_settings
from var_jax.utils import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog='python -m var_jax.edit', description=__doc__.split('\n\n')[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--checkpoint', required=True, help='converted checkpoint or training workdir')
    p.add_argument('--step', type=int, help='training workdirs: the step to load (default: the latest)')
    p.add_argument('--image', required=True, help='input image (any format PIL reads)')
    p.add_argument('--mask', required=True, help='mask image of the same size; white = the region of --mode')
    p.add_argument('--mode', choices=MODES, default='inpaint',
                   help='inpaint (default), outpaint or edit, see below')
    p.add_argument('--class', dest='label', type=int, help='class to generate (required for --mode edit)')
    p.add_argument('--out', required=True, help='output image, PNG or the format its suffix names (.jpg, .webp, '
                                                '...): the edited image at the model resolution')
    p.add_argument('--force', action='store_true', help='overwrite an existing --out file')
    add_sampling_flags(p, 'the demo: cfg 3, top_k 900, top_p 0.95, --more_smooth')
    return p


def run(args: argparse.Namespace) -> None:
    edit_file(args.checkpoint, args.image, args.mask, args.out, resolve_settings(args, EDIT_DEMO), mode=args.mode,
              label=args.label, seed=args.seed, step=args.step, force=args.force, dtype=args.dtype)


def main(argv=None) -> int:
    return cli.run(lambda: run(build_parser().parse_args(argv)))  # None: exit 0


if __name__ == '__main__':
    sys.exit(main())
