"""VAR-d20 (600M) at 256px, the official recipe: bs 768, 250 ep, tblr 1e-4 (peak lr 3e-4), alng 1e-3, wpe 0.1."""
from var_jax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, runlocal=False)
    return config_lib.var_recipe(depth=20, batch_size=768, epochs=250, tblr=1e-4, alng=1e-3, wpe=0.1,
                                 runlocal=a.runlocal)
