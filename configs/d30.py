"""VAR-d30 (2.0B) at 256px, the official recipe: bs 1024, 350 ep, tblr 8e-5 (peak lr 3.2e-4), alng 1e-5,
wpe 0.01, twde 0.08. Shard parameters and optimizer state: --config.mesh.fsdp=8 (or more)."""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, runlocal=False)
    c = configs.var_recipe(depth=30, batch_size=1024, epochs=350, tblr=8e-5, alng=1e-5, wpe=0.01, twde=0.08,
                           runlocal=a.runlocal)
    c.mesh.update(data=-1, fsdp=8)
    return c
