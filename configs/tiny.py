"""The built-in default: shapes10 (32px, 10 classes, no download) on a 2-core CPU.

Trains the small tokenizer first (configs/tokenizer_tiny.py settings) when none is given, then a
small VAR (depth 4, width 128, 2 heads, 130 tokens per image over scales 1, 2, 3, 4, 6, 8), then
writes a sample grid and the built-in classifier scores (docs/builtin_default.md has the numbers).

    python -m var_jax.train --config=configs/tiny.py --workdir=runs/tiny
    python -m var_jax.train --config=configs/tiny.py:ci --workdir=/tmp/ci   # the CI end-to-end run

`ci` shortens every phase (tokenizer 600 steps, a depth-2 VAR for 1,200 steps of batch 8, 20 scored
samples per class) so that the test finishes in a few minutes; it checks that the pipeline learns (about 31 %
guided, chance 10 %), not how well.
"""
from var_jax.training import configs


def get_config(arg=None):
    a = configs.parse_arg(arg, ci=False)
    # batch 8: on 2 CPU cores the step is about as fast per image as batch 16 or 32, and smaller
    # batches learn more per image seen (docs/builtin_default.md)
    c = configs.var_recipe(depth=4, batch_size=8, epochs=0, tblr=2e-3, alng=1e-3, wpe=0.1)
    c.total_steps = 4000
    c.model.update(width=128, num_heads=2, patch_nums=(1, 2, 3, 4, 6, 8), dtype='float32', drop_path_rate=0.0,
                   scan_layers=False)  # unrolled: 4 layers compile fast and run a little faster on CPU
    c.data = configs.data_config(source='builtin', image_size=32, workers=0)
    c.optim.update(lr=2e-3, wp_epochs=0.2, wd=0.05, wd_end=0.05)
    c.tokenizer.train = configs.tokenizer_tiny()
    c.sample.update(classes=tuple(range(10)), per_class=8, cfg=5.0, top_k=0, top_p=0.0)
    c.log_every, c.checkpoint_every, c.eval_every = 100, 1000, 0
    c.evaluate, c.score_per_class = True, 100
    if a.ci:
        t = c.tokenizer.train
        t.total_steps, t.log_every, t.checkpoint_every, t.eval_batches = 600, 100, 600, 2
        c.total_steps, c.log_every, c.checkpoint_every = 1200, 100, 600
        c.model.update(depth=2)
        c.score_per_class = 20
    return c
