"""Your own labelled images in one command: a tokenizer and a VAR trained on the same folder.

    python -m var_jax.train --config=configs/folder.py --config.data.path=DIR --workdir=runs/mine
    python -m var_jax.train --config=configs/folder.py:res=64 --config.data.path=DIR --workdir=runs/mine64
    python -m var_jax.evaluate --workdir runs/mine          # the folder score again

DIR holds one subfolder per class (DIR/<class>/<image>; class names are the folder names). The
data settings are given once (`config.data`) and both phases read them (training/own_data.py):
the tokenizer trains on DIR first (unless --config.tokenizer.checkpoint names one), then VAR on
its tokens; a labelled sample grid and the folder score (eval/folder_score.py: a classifier
trained on DIR's own training images judges the samples) close the run. Without a separate
--config.data.eval_path, 10 % of each class is held out by a fixed rule (data/split.py). Running
the command again resumes. docs/own_data.md has the measured numbers and the common mistakes.

Presets after ':' (comma-separated):
  res=32|64|128|256   image size; the tokenizer downsamples 4x / 8x / 8x / 16x and the scales are
                      models.config.patch_nums_for(res) (other sizes: the rule there)
  size=cpu            (default) a CPU run of a few thousand small images in about 15 minutes:
                      tokenizer 1,200 steps (batch 16), VAR depth 4 / width 128, 3,000 steps of batch 8
  size=gpu            the same recipe scaled up for one accelerator: wider tokenizer (ch 64, V 1024),
                      VAR depth 12 (width 768), batch 64, 20,000 + 30,000 steps, bfloat16; not
                      measured here (no accelerator), a starting point
  size=ci             a few hundred steps each: checks the pipeline end to end (tests/test_own_data.py)
"""
from ml_collections import ConfigDict

from var_jax.models.config import downsample_for, patch_nums_for
from var_jax.training import configs

CH_MULT = {4: (1, 2, 2), 8: (1, 2, 2, 4), 16: (1, 1, 2, 2, 4)}  # downsampling -> tokenizer levels


def get_config(arg=None):
    a = configs.parse_arg(arg, res=32, size='cpu')
    if a.size not in ('ci', 'cpu', 'gpu'):
        raise ValueError(f'size must be ci, cpu or gpu, got {a.size!r}')
    pn = patch_nums_for(a.res)
    c = configs.var_recipe(depth=4, batch_size=8, epochs=0, tblr=2e-3, alng=1e-3, wpe=0.1)
    c.total_steps = 3000
    c.model.update(width=128, num_heads=2, patch_nums=pn, dtype='float32', drop_path_rate=0.0, scan_layers=False)
    # the data, given once: --config.data.path=DIR (the tokenizer phase reads this too)
    c.data = configs.data_config(source='imagefolder', image_size=a.res, workers=0, holdout=0.1)
    c.optim.update(lr=2e-3, wp_epochs=0.2, wd=0.05, wd_end=0.05)
    c.tokenizer.train = _tokenizer(a.res, pn)
    c.sample.update(classes=tuple(range(16)), per_class=8, cfg=5.0, top_k=0, top_p=0.0)
    c.log_every, c.checkpoint_every, c.eval_every = 100, 1000, 0
    c.evaluate, c.score_per_class = True, 50
    # fine-tuning a converted official VAR (--config.init_from=DIR; training/finetune.py)
    # freeze: regexes of parameter names kept as loaded, e.g. ('blocks',); class_map: old class per new class
    c.finetune = ConfigDict(dict(freeze=(), class_map=()))
    t = c.tokenizer.train
    if a.size == 'ci':
        t.total_steps, t.log_every, t.checkpoint_every, t.eval_batches = 300, 100, 300, 1
        c.total_steps, c.log_every, c.checkpoint_every = 600, 100, 300
        c.model.update(depth=2)
        c.score_per_class = 20
    elif a.size == 'gpu':
        t.model.update(ch=64, vocab_size=1024, z_channels=32, num_groups=32)
        t.batch_size, t.total_steps, t.checkpoint_every = 64, 20_000, 2000
        c.model.update(depth=12, width=768, num_heads=12, dtype='bfloat16', drop_path_rate=-1.0, scan_layers=True)
        c.batch_size, c.total_steps, c.checkpoint_every = 64, 30_000, 2000
        c.optim.update(lr=4e-4)
        c.data.workers = 8
    return c


def _tokenizer(res: int, pn: tuple[int, ...]) -> ConfigDict:
    """configs/tokenizer_tiny.py's recipe at `res`, without its own data (it reads config.data)."""
    t = configs.tokenizer_tiny().to_dict()
    del t['data']
    t = ConfigDict(t)
    t.model.update(ch_mult=CH_MULT[downsample_for(res)], patch_nums=pn)
    return t
