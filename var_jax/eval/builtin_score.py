"""The built-in score: did a VAR trained on shapes10 learn to draw the ten classes?

Judged by a classifier trained on real images only (classifier.py), so the score does not depend
on the generator or its tokenizer. For a training workdir (or a model checkpoint) it reports

    eval/classifier_test_acc   the judge's accuracy on the 1,000 held-out real test images
    eval/guided_class_acc      fraction of guided samples (cfg) the judge assigns to their class
    eval/unguided_class_acc    the same without guidance (cfg = 0)
    eval/recon_class_acc       the same for the tokenizer's reconstructions of the test images
    eval/fd_*                  Fréchet distance to the real test images in the judge's features:
                               guided, unguided, recon, train_vs_test (the floor: real vs real)
                               and two trivial baselines, baseline_noise and baseline_class_means

and writes them to `workdir/eval.json`. See docs/builtin_eval.md for how to read the numbers.
Workdir checks (`check_workdir`) read JSON only, so the CLI rejects bad inputs before JAX starts.
"""
from __future__ import annotations

import json
import sys
import time
import uuid

import numpy as np
from etils import epath

from var_jax.data import builtin
from var_jax.sampling.settings import Settings, check_settings

# JAX (and what imports it: the sampler, the checkpoint reader, the judge) is imported inside the
# functions that need it, after the inputs are known good: `python -m var_jax.evaluate --workdir`
# reports a bad input at once, before JAX starts.

EVAL_FILE = 'eval.json'
DEFAULT_CFG = 5.0  # when the workdir's config.json names no sample.cfg (the tiny recipe's value)
SAMPLE_BATCH = 100  # images per sampler call: one compiled program; larger batches were slower per image on CPU
MAX_PER_CLASS = 1000  # the train split has 1,000 images per class (the train-vs-test floor uses them)


# ---------------------------------------------------------------------------- inputs (JSON only)
def _read_json(path: epath.Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: corrupt {what} ({e})') from None


def check_workdir(workdir) -> dict:
    """Is `workdir` a VAR trained on the built-in data? -> {'cfg': default guidance}; ValueError if not.

    A training workdir says what it was trained on in config.json (data.source); a model
    checkpoint written by `checkpoint.save_model` has no config.json and qualifies when its
    model.json names the shapes10 classes (`class_names`, as training workdirs record them).
    """
    w = epath.Path(workdir)
    if not w.is_dir():
        raise ValueError(f'{workdir}: no such workdir')
    if not (w / 'model.json').exists():
        raise ValueError(f'{workdir}: not a var_jax workdir or model checkpoint (no model.json)')
    model = _read_json(w / 'model.json', 'model.json')
    if not model.get('var'):
        raise ValueError(f'{workdir}: holds a tokenizer only; the built-in score needs a trained VAR')
    if not model.get('vqvae'):
        raise ValueError(f'{workdir}: holds no tokenizer config')
    config = _read_json(w / 'config.json', 'config.json') if (w / 'config.json').exists() else None
    if config is not None:
        source = (config.get('data') or {}).get('source')
        if source != 'builtin':
            raise ValueError(f'{workdir}: trained on data.source={source!r}; the built-in score only judges '
                             'models trained on the built-in shapes10 data (data.source=\'builtin\')')
    elif tuple(model.get('class_names') or ()) != builtin.CLASS_NAMES:
        raise ValueError(f'{workdir}: cannot tell what it was trained on (no config.json, and model.json '
                         'names no shapes10 class_names); the built-in score only judges shapes10 models')
    if model['var'].get('num_classes', 0) < builtin.NUM_CLASSES:
        raise ValueError(f'{workdir}: the VAR has {model["var"].get("num_classes")} classes, '
                         f'shapes10 has {builtin.NUM_CLASSES}')
    cfg = ((config or {}).get('sample') or {}).get('cfg')
    return {'cfg': float(cfg) if cfg is not None else DEFAULT_CFG}


def check_per_class(per_class) -> None:
    if not 1 <= per_class <= MAX_PER_CLASS or int(per_class) != per_class:
        raise ValueError(f'per_class must be an integer in [1, {MAX_PER_CLASS}], got {per_class}')


# ---------------------------------------------------------------------------- Fréchet distance
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (N, D).

    The trace of the square root is taken as sum(sqrt(eig(A S_b A))) with A = S_a^(1/2): the
    symmetric form has real, non-negative eigenvalues even when a set has fewer than D + 1 images
    (singular covariances, or the duplicated images of the class-mean baseline), where scipy's
    sqrtm of the non-symmetric product returns complex or NaN values. Equal to ADM's formula.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f'need two feature sets (N >= 2, D) of one D, got {a.shape} and {b.shape}')
    diff = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sb @ root
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return max(float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt), 0.0)


# ---------------------------------------------------------------------------- image sets
def _real(split: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` images of a split (class = index % 10, so balanced) as float [0, 1]."""
    pairs = [builtin.render(split, i, size) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255
    return images, np.asarray([p[1] for p in pairs], np.int32)


def _baselines(train: np.ndarray, train_labels: np.ndarray, n: int, per_class: int, seed: int) -> dict:
    """Generators that know pixel statistics of the training set but nothing about shapes."""
    rng = np.random.default_rng(seed)
    mean, std = train.mean(0), train.std(0)
    noise = np.clip(mean + std * rng.standard_normal((n,) + mean.shape, np.float32), 0, 1)
    class_means = np.stack([train[train_labels == c].mean(0) for c in range(builtin.NUM_CLASSES)])
    return {'noise': noise, 'class_means': np.repeat(class_means, per_class, axis=0)}


def _samples(var, vqvae, labels, index, *, cfg, top_k, top_p, seed) -> np.ndarray:
    """Float images in [0, 1], SAMPLE_BATCH at a time on the parameters' device (keys
    `image_keys(seed, class, index)`, the last batch padded)."""
    from var_jax.sampling import batch  # noqa: PLC0415  (JAX; see the note above)

    settings = Settings(float(cfg), int(top_k), float(top_p), more_smooth=False)
    return batch.Sampler(var, vqvae, settings, seed, min(SAMPLE_BATCH, len(labels))).sample(labels, index)


def _reconstructions(vqvae, images: np.ndarray) -> np.ndarray:
    from var_jax.sampling.batch import pad_rows  # noqa: PLC0415  (JAX; see the note above)

    size = min(SAMPLE_BATCH, len(images))
    out = []
    for i in range(0, len(images), size):
        chunk = images[i:i + size]
        rec = vqvae.idx_to_img(vqvae.img_to_idx(pad_rows(chunk, size) * 2 - 1))
        out.append((np.asarray(rec)[:len(chunk)] + 1) / 2)
    return np.concatenate(out)


# ---------------------------------------------------------------------------- the score
def evaluate_workdir(workdir, *, per_class: int = 100, cfg: float | None = None, top_k: int = 0,
                     top_p: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Score the latest VAR (and its tokenizer) in `workdir`; writes `workdir/eval.json`."""
    return score(workdir, per_class=per_class, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)[0]


def score(workdir, *, per_class: int = 100, cfg: float | None = None, top_k: int = 0, top_p: float = 0.0,
          seed: int = 0) -> tuple[dict[str, float], dict]:
    """-> (metrics, the settings they were measured with); both go to `workdir/eval.json`.

    `per_class` samples of each class are drawn with guidance `cfg` (default: the workdir's
    sample.cfg, else 5.0) and again with cfg = 0, from keys `image_keys(seed, class, index)`.
    Images of another size than the judge's 32x32 are resized (antialiased) for it, real ones too.
    """
    t0 = time.time()
    check_per_class(per_class)
    check_settings(DEFAULT_CFG if cfg is None else cfg, top_k, top_p, prefix='')  # cfg None: the workdir's
    info = check_workdir(workdir)
    cfg = info['cfg'] if cfg is None else float(cfg)

    import jax  # noqa: PLC0415  (JAX; see the note above)

    from var_jax.eval import classifier  # noqa: PLC0415  (imports JAX: likewise)
    from var_jax.io import checkpoint  # noqa: PLC0415  (imports JAX and Orbax: likewise)

    timings = {}

    def timed(name, fn, *args, **kw):
        t = time.time()
        result = fn(*args, **kw)
        timings[name] = round(time.time() - t, 1)
        print(f'[eval] {name}: {timings[name]:.0f} s', file=sys.stderr, flush=True)
        return result

    vqvae, var = timed('load', checkpoint.open_checkpoint(workdir).load)  # first: fails fast
    judge = timed('judge', classifier.get_judge, seed=0)  # one fixed judge: comparable across runs and seeds
    size = vqvae.config.image_size
    n = per_class * builtin.NUM_CLASSES
    labels = np.repeat(np.arange(builtin.NUM_CLASSES, dtype=np.int32), per_class)
    index = np.tile(np.arange(per_class, dtype=np.int32), builtin.NUM_CLASSES)

    test, test_labels = builtin.load('test', size)
    test = test.astype(np.float32) / 255
    train, train_labels = _real('train', n, size)
    sample_args = dict(top_k=top_k, top_p=top_p, seed=seed)
    sets = {'guided': timed('guided samples', _samples, var, vqvae, labels, index, cfg=cfg, **sample_args),
            'unguided': timed('unguided samples', _samples, var, vqvae, labels, index, cfg=0.0, **sample_args),
            'recon': timed('reconstructions', _reconstructions, vqvae, test), 'train_vs_test': train}
    sets.update({f'baseline_{k}': v for k, v in _baselines(train, train_labels, n, per_class, seed).items()})

    t = time.time()
    ref, ref_logits = judge.outputs(test)
    test_acc = float(np.mean(ref_logits.argmax(-1) == test_labels)) if size == classifier.INPUT_SIZE \
        else classifier.accuracy(judge)  # the judge's own accuracy is at its native 32x32
    out = {'eval/classifier_test_acc': test_acc}
    feats = {}
    for name, images in sets.items():
        feats[name], logits = judge.outputs(images)
        if name in ('guided', 'unguided', 'recon'):
            want = test_labels if name == 'recon' else labels
            out[f'eval/{name}_class_acc'] = float(np.mean(logits.argmax(-1) == want))
    out.update({f'eval/fd_{name}': frechet_distance(f, ref) for name, f in feats.items()})
    timings['judging'] = round(time.time() - t, 1)

    settings = {'per_class': per_class, 'samples': n, 'cfg': cfg, 'top_k': int(top_k), 'top_p': float(top_p),
                'seed': seed, 'image_size': size, 'reference': f'shapes10/test ({len(test)} images)',
                'judge': {'test_acc': judge.test_acc, 'train_seconds': round(judge.train_seconds, 1),
                          'cached': judge.cached, 'file': str(classifier.cache_path(0))},
                'seconds': round(time.time() - t0, 1), 'timings': timings}
    if jax.process_index() == 0:
        _write_json(epath.Path(workdir) / EVAL_FILE, {**out, 'settings': settings})
    return out, settings


def stored_score(workdir, *, per_class: int, cfg: float, top_k: int, top_p: float, seed: int) -> dict | None:
    """The metrics in `workdir/eval.json` if they were measured with these settings on the
    workdir's latest checkpoint (written after it), else None."""
    w = epath.Path(workdir)
    path = w / EVAL_FILE
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        got = stored['settings']
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None  # unreadable: score again (and overwrite it)
    want = {'per_class': per_class, 'cfg': float(cfg if cfg is not None else got.get('cfg', -1)),
            'top_k': int(top_k), 'top_p': float(top_p), 'seed': seed}
    if any(got.get(k) != v for k, v in want.items()):
        return None
    ckpts = w / 'checkpoints'
    steps = [p for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(p.stat().mtime for p in steps) > path.stat().mtime:
        return None  # a newer checkpoint than the score
    return {k: v for k, v in stored.items() if k.startswith('eval/')}


def _write_json(path: epath.Path, payload: dict) -> None:
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}'
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)  # epath.rename refuses to overwrite an existing file


# ---------------------------------------------------------------------------- report
ROWS = (('eval/classifier_test_acc', 'judge accuracy, real test images', '%'),
        ('eval/guided_class_acc', 'class accuracy, guided samples', '%'),
        ('eval/unguided_class_acc', 'class accuracy, unguided samples', '%'),
        ('eval/recon_class_acc', 'class accuracy, reconstructions', '%'),
        (None, 'Fréchet distance to the real test images (judge features; lower is better)', ''),
        ('eval/fd_train_vs_test', '  real train images (the floor)', 'f'),
        ('eval/fd_recon', '  tokenizer reconstructions', 'f'),
        ('eval/fd_guided', '  guided samples', 'f'),
        ('eval/fd_unguided', '  unguided samples', 'f'),
        ('eval/fd_baseline_class_means', '  baseline: class-mean images', 'f'),
        ('eval/fd_baseline_noise', '  baseline: per-pixel noise', 'f'))


def format_results(results: dict[str, float], settings: dict | None = None) -> str:
    head = [f'shapes10 score: {settings["samples"]} samples ({settings["per_class"]} per class), '
            f'cfg {settings["cfg"]:g}, top_k {settings["top_k"]}, top_p {settings["top_p"]:g}, '
            f'seed {settings["seed"]}; chance accuracy is 10 %'] if settings else []
    return '\n'.join(head + format_rows(results))


def format_rows(results: dict[str, float], rows=ROWS) -> list[str]:
    """One line per row (key, label, '%' or 'f') whose key is in `results`; key None: a heading."""
    lines = []
    for key, label, kind in rows:
        if key is None:
            lines.append(label)
        elif key in results:
            v = results[key]
            lines.append(f'  {label:<40} ' + (f'{100 * v:6.1f} %' if kind == '%' else f'{v:8.3g}'))
    return lines
