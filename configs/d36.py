"""VAR-d36-s (2.3B) at 512px with shared AdaLN, the official recipe: bs 768, 350 ep, tblr 8e-5 (peak lr 2.4e-4),
alng 5e-6, wpe 0.01, twde 0.08, --saln=1 --pn=512 (here model.shared_aln, data.image_size=512). Shard with
--config.mesh.fsdp."""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, runlocal=False)
    c = configs.var_recipe(depth=36, batch_size=768, epochs=350, tblr=8e-5, alng=5e-6, wpe=0.01, twde=0.08,
                           image_size=512, runlocal=a.runlocal)
    c.mesh.update(data=-1, fsdp=8)
    return c
