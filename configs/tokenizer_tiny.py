"""A small multi-scale tokenizer for the built-in 32px images: 4x downsampling, 8x8 latent, scales 1..8."""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, runlocal=False)
    return configs.tokenizer_tiny(runlocal=a.runlocal)
