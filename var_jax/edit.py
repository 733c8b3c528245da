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

import jax
import numpy as np
from PIL import Image, ImageOps

from var_jax.data.images import to_l8, to_rgb8
from var_jax.io import outputs
from var_jax.sample import open_checkpoint
from var_jax.sampling import editing
from var_jax.sampling.settings import add_sampling_flags, check_settings
from var_jax.utils import cli

DEMO = dict(cfg=3.0, top_k=900, top_p=0.95, more_smooth=True)  # demo_zero_shot_edit.ipynb's call


def read_image(path: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not halfway through the edit
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f'{path}: cannot read the {what} ({e})') from None


def fit(im: Image.Image, size: int, resample) -> np.ndarray:
    """Largest centred square, resized to size x size."""
    return np.asarray(ImageOps.fit(im, (size, size), method=resample, centering=(0.5, 0.5)))


def load_inputs(image_path: str, mask_path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> image (S, S, 3) float32 in [0, 1], mask (S, S) float64 in [0, 1] (1 = white)."""
    image, mask = read_image(image_path, 'image'), read_image(mask_path, 'mask')
    if mask.size != image.size:
        raise ValueError(f'{mask_path}: the mask is {mask.size[0]}x{mask.size[1]} but the image is '
                         f'{image.size[0]}x{image.size[1]}; they must have the same size')
    rgb = fit(to_rgb8(image), size, Image.Resampling.LANCZOS).astype(np.float32) / 255  # 16-bit: scaled
    m = fit(to_l8(mask), size, Image.Resampling.BOX).astype(np.float64) / 255
    return rgb, m


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog='python -m var_jax.edit', description=__doc__.split('\n\n')[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--checkpoint', required=True, help='converted checkpoint or training workdir')
    p.add_argument('--step', type=int, help='training workdirs: the step to load (default: the latest)')
    p.add_argument('--image', required=True, help='input image (any format PIL reads)')
    p.add_argument('--mask', required=True, help='mask image of the same size; white = the region of --mode')
    p.add_argument('--mode', choices=('inpaint', 'outpaint', 'edit'), default='inpaint',
                   help='inpaint (default), outpaint or edit, see below')
    p.add_argument('--class', dest='label', type=int, help='class to generate (required for --mode edit)')
    p.add_argument('--out', required=True, help='output image, PNG or the format its suffix names (.jpg, .webp, '
                                                '...): the edited image at the model resolution')
    p.add_argument('--force', action='store_true', help='overwrite an existing --out file')
    add_sampling_flags(p, 'the demo: cfg 3, top_k 900, top_p 0.95, --more_smooth')
    return p


def run(args: argparse.Namespace) -> int:
    settings = check_settings(**{k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEMO.items()})
    if args.seed < 0:
        raise ValueError(f'--seed must be >= 0, got {args.seed}')
    ck = open_checkpoint(args.checkpoint, args.step)
    n = ck.num_classes
    if args.label is None and args.mode == 'edit':
        raise ValueError('--mode edit needs --class: the class to redraw the masked region as')
    if args.label is not None and not 0 <= args.label < n:
        raise ValueError(f'unknown class {args.label}: this model has classes 0..{n - 1}')
    image, mask = load_inputs(args.image, args.mask, ck.image_size)
    outputs.image_format(args.out)  # before the model is loaded
    outputs.check_file_output(args.out, force=args.force)
    vqvae, var = ck.load(args.dtype)
    label = n if args.label is None else args.label  # n: the null class, unconditional as in the demo
    region = 1 - mask if args.mode == 'outpaint' else mask  # editing.edit wants 1 = generate
    out, _, free = editing.edit(var, vqvae, image[None], region, label, jax.random.key(args.seed),
                                cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p,
                                more_smooth=settings.more_smooth)
    outputs.save_image(args.out, np.asarray(out[0]))
    sampled = sum(int(f.sum()) for f in free)
    print(f'wrote {args.out}: {args.mode}, {sampled}/{sum(f.size for f in free)} tokens generated, '
          f'{"unconditional" if label == n else f"class {label}"}, {settings.describe()}, seed {args.seed}',
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli.run(lambda: run(build_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
