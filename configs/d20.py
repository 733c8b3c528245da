"""VAR-d20 (600M) at 256px, the official recipe: bs 768, 250 ep, tblr 1e-4 (peak lr 3e-4), alng 1e-3, wpe 0.1."""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, runlocal=False)
    return configs.var_recipe(depth=20, batch_size=768, epochs=250, tblr=1e-4, alng=1e-3, wpe=0.1,
                              runlocal=a.runlocal)
