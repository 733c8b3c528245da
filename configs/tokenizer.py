"""Multi-scale VQVAE with the official architecture (ch 160, ch_mult 1,1,2,2,4, V 4096, Cvae 32, 256px):
L1 + VQ + LPIPS + PatchGAN (from step 20k, VQGAN adaptive weight), dead-code re-seeding, on ImageNet (TFDS).
Fine-tune the official VQVAE instead with --config.init_from=DIR (a `python -m var_jax.convert` output)."""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, runlocal=False)
    return configs.tokenizer_recipe(runlocal=a.runlocal)
