"""VAR-d24 (1.0B) at 256px, the official recipe: bs 768, 350 ep, tblr 8e-5 (peak lr 2.4e-4), alng 1e-4, wpe 0.01."""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, runlocal=False)
    return configs.var_recipe(depth=24, batch_size=768, epochs=350, tblr=8e-5, alng=1e-4, wpe=0.01,
                              runlocal=a.runlocal)
