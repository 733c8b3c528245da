"""A small multi-scale tokenizer for the built-in 32px images: 4x downsampling, 8x8 latent, scales 1..8."""
from var_jax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, runlocal=False)
    return config_lib.tokenizer_tiny(runlocal=a.runlocal)
