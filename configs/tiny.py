"""The built-in default: shapes10 (32px, 10 classes, no download) on a CPU in minutes.

Trains the small tokenizer first (configs/tokenizer_tiny.py settings) when none is given, then a
small VAR, then writes a sample grid and the built-in classifier scores.
"""
from var_jax import config_lib


def get_config(arg=None):
    c = config_lib.var_recipe(depth=4, batch_size=64, epochs=0, tblr=1e-3, alng=1e-3, wpe=0.1, arg=arg)
    c.total_steps = 2000
    c.model.update(width=256, num_heads=4, patch_nums=(1, 2, 3, 4, 6, 8), dtype='float32', drop_path_rate=0.0)
    c.data = config_lib.data_config(source='builtin', image_size=32, workers=0)
    c.optim.update(wp_epochs=0.5, wd=0.05, wd_end=0.05)
    c.tokenizer.train = config_lib.tokenizer_tiny()
    c.sample.update(classes=tuple(range(10)), per_class=8, cfg=3.0, top_k=0, top_p=0.0)
    c.log_every, c.checkpoint_every, c.eval_every = 100, 500, 0
    c.evaluate = True
    return c
