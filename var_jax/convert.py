"""Official VAR checkpoints (PyTorch state dicts) -> a var_jax model checkpoint (Orbax).

    python -m var_jax.convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out DIR

Configs are inferred from the tensor shapes; unknown, missing, mis-shaped or non-finite weights
are refused, naming the official key (var_jax.io.official). --force replaces only a previous
converted checkpoint (model.json and params/), never another directory (var_jax.io.outputs).
"""
from __future__ import annotations

import sys

from var_jax.io import official
from var_jax.utils import cli


def build_parser() -> cli.Parser:
    p = cli.Parser(prog='python -m var_jax.convert', description=__doc__.split('\n\n')[0])
    p.add_argument('--vae', required=True, help='official VQVAE weights (vae_ch160v4096z32.pth)')
    p.add_argument('--var', help='official VAR weights (var_d16.pth ... var_d36.pth)')
    p.add_argument('--out', required=True, help='output directory (an Orbax model checkpoint)')
    p.add_argument('--patch_nums', help='comma-separated scales, if they cannot be inferred')
    p.add_argument('--force', action='store_true',
                   help='replace --out if it is a previous converted checkpoint (never any other directory)')
    return p


def main(argv=None) -> int:
    def convert():
        args = build_parser().parse_args(argv)
        print(official.convert(args.vae, args.var, args.out, patch_nums=args.patch_nums, force=args.force))

    return cli.run(convert)


if __name__ == '__main__':
    sys.exit(main())
