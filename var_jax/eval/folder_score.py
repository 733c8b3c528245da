"""An honest score for a VAR trained on any labelled image folder (the built-in score, generalised).

The judge is the built-in score's small CNN (classifier.py) trained on the folder's own training
images only, never on a generated one, so the score does not depend on the generator or its
tokenizer. It is meaningful only as far as the judge is: its accuracy on the held-out real images
is the first number reported, and class accuracies of samples are read against it (a judge at
60 % cannot certify samples at 90 %). For a training workdir it reports

    eval/classifier_test_acc   the judge's accuracy on the held-out real images
    eval/guided_class_acc      fraction of guided samples (cfg) the judge assigns to their class
    eval/unguided_class_acc    the same without guidance (cfg = 0)
    eval/recon_class_acc       the same for the tokenizer's reconstructions of the held-out images
    eval/fd_*                  Fréchet distance to the held-out images in the judge's features:
                               guided, unguided, recon, train_vs_test (real training images: the
                               floor) and baseline_class_means (each class's mean training image)
    eval/fid_*, eval/kid_*     with `inception` (pytorch-fid weights): FID and KID (x 1e3) of the
                               guided samples and the reconstructions against the held-out images

Chance is 1 / number of classes. Held-out images: `data.eval_path` when given, else the folder's
deterministic split (var_jax/data/split.py, `data.holdout`), else (neither) the training images
themselves, which the report says (the judge's accuracy is then not a held-out one).

The judge works at 32x32 (images of other sizes are resized, antialiased) and is trained for at
least MIN_STEPS steps; its parameters are kept in the workdir under a name that hashes the
training file list, this file, classifier.py and the settings, so a rerun does not retrain it.
The numbers go to `workdir/eval.json` like the built-in score's (builtin_score.stored_score
reads both).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import sys
import time
import warnings

import numpy as np
from etils import epath
from ml_collections import ConfigDict

from var_jax.eval import builtin_score, classifier
from var_jax.sampling.settings import check_settings

JUDGE_PREFIX = 'folder_judge'
MIN_STEPS = 300  # judge steps however few images: ~30 s on 2 idle CPU cores
EPOCHS = 6
LOAD_BATCH = 64


# ---------------------------------------------------------------------------- inputs (JSON only)
def check_workdir(workdir) -> dict:
    """-> {'data': the run's data config, 'cfg': its sample.cfg}; ValueError naming what is wrong."""
    w = epath.Path(workdir)
    if not w.is_dir():
        raise ValueError(f'{workdir}: no such workdir')
    for name in ('model.json', 'config.json'):
        if not (w / name).exists():
            raise ValueError(f'{workdir}: not a var_jax training workdir (no {name})')
    model = builtin_score._read_json(w / 'model.json', 'model.json')
    config = builtin_score._read_json(w / 'config.json', 'config.json')
    if not model.get('var') or not model.get('vqvae'):
        raise ValueError(f'{workdir}: holds no trained VAR and tokenizer')
    data = config.get('data') or {}
    if data.get('source') != 'imagefolder':
        raise ValueError(f'{workdir}: trained on data.source={data.get("source")!r}; the folder score judges '
                         "runs on an image folder (data.source='imagefolder')")
    if not data.get('path'):
        raise ValueError(f'{workdir}: its config.json names no image folder (data.path)')
    if not os.path.isdir(data['path']):
        raise ValueError(f'{workdir}: its image folder {data["path"]} is gone; the judge trains on it')
    cfg = (config.get('sample') or {}).get('cfg')
    return {'data': data, 'cfg': float(cfg) if cfg is not None else builtin_score.DEFAULT_CFG}


# ---------------------------------------------------------------------------- the folder's images
def load_split(data: dict, split: str, *, max_images: int = 0) -> tuple[np.ndarray, np.ndarray, object]:
    """-> (uint8 images (N, res, res, 3), int32 labels, source) of a split, with the eval transform
    (shorter side to 1.125 res, centre crop) that matches what training crops look like."""
    from var_jax.data.pipeline import make_dataset  # noqa: PLC0415  (grain: only once the inputs are good)

    cfg = ConfigDict(dict(data, workers=0))
    it, source = make_dataset(cfg, split=split, local_batch=LOAD_BATCH, seed=0, train=False)
    images, labels = [], []
    for b in it:
        images.append(b['image'])
        labels.append(b['label'])
        if max_images and sum(map(len, labels)) >= max_images:
            break
    images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int32)
    if max_images:
        images, labels = images[:max_images], labels[:max_images]
    return images, labels, source


def has_held_out(data: dict) -> bool:
    return bool(data.get('eval_path') or data.get('holdout'))


# ---------------------------------------------------------------------------- the judge
def judge_config(n_train: int) -> dict:
    """The built-in judge's settings, with at least MIN_STEPS steps (a small folder is seen more often)."""
    batch = min(classifier.CONFIG['batch_size'], n_train)
    per_epoch = n_train // batch
    return dict(classifier.CONFIG, batch_size=batch, epochs=max(EPOCHS, math.ceil(MIN_STEPS / per_epoch)))


def _judge_path(workdir, source, config: dict, seed: int) -> epath.Path:
    h = hashlib.sha256()
    for f in (pathlib.Path(__file__), pathlib.Path(classifier.__file__)):
        h.update(f.read_bytes())
    h.update(json.dumps({'config': config, 'seed': seed, 'classes': list(source.class_names)}).encode())
    for f, y in zip(source.files, source.labels):
        st = os.stat(f)
        h.update(f'{f}\0{st.st_size}\0{st.st_mtime_ns}\0{y}\n'.encode())
    return epath.Path(workdir) / f'{JUDGE_PREFIX}-{h.hexdigest()[:16]}.npz'


def small(images: np.ndarray) -> np.ndarray:
    """uint8 images at the judge's 32x32 (antialiased), in chunks."""
    if images.shape[1:3] == (classifier.INPUT_SIZE,) * 2:
        return images
    out = [np.asarray(classifier.to_input(images[i:i + 256])) for i in range(0, len(images), 256)]
    return np.round(np.concatenate(out) * 255).astype(np.uint8)


def get_judge(workdir, train_images, train_labels, source, *, seed: int = 0, verbose: bool = True):
    """The judge of this folder: loaded from the workdir, or trained on its training images (and kept)."""
    config = judge_config(len(train_labels))
    path = _judge_path(workdir, source, config, seed)
    if path.exists():
        try:
            return classifier.load(path, seed, config, source.num_classes)
        except Exception as e:  # noqa: BLE001  (an unreadable judge file is trained over, never an error)
            warnings.warn(f'{path}: unreadable judge ({type(e).__name__}: {e}); retraining')
    if verbose:
        print(f'[judge] training a classifier on the {len(train_labels)} training images of {source.num_classes} '
              f'classes ({config["epochs"]} epochs, kept at {path})', file=sys.stderr, flush=True)
    judge = classifier.fit(small(train_images), train_labels, source.num_classes, seed, config, augment='shift',
                           verbose=verbose)
    try:
        classifier.save(judge, path)
    except OSError as e:
        warnings.warn(f'{path}: cannot keep the judge ({e})')
    return judge


# ---------------------------------------------------------------------------- FID / KID (Inception)
def kid(a: np.ndarray, b: np.ndarray, subsets: int = 10, size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, averaged over
    random subsets of min(size, |a|, |b|) features (Bińkowski et al. 2018)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng, d = np.random.default_rng(seed), a.shape[1]
    m = min(size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals))


def _inception_metrics(path: str, ref: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    from var_jax.eval import adm, inception, tokenizer_metrics  # noqa: PLC0415  (only with --inception)

    extract = adm.FeatureExtractor(inception.load_inception(path)).extract
    ref_pool = extract(ref, 'held-out')['pool']
    out = {}
    for name, images in sets.items():
        pool = extract(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8), name)['pool']
        out[f'eval/fid_{name}'] = tokenizer_metrics.rfid(ref_pool, pool)
        out[f'eval/kid_{name}'] = 1e3 * kid(ref_pool, pool)
    return out


# ---------------------------------------------------------------------------- the score
def score(workdir, *, per_class: int = 50, cfg: float | None = None, top_k: int = 0, top_p: float = 0.0,
          seed: int = 0, inception: str | None = None, verbose: bool = True) -> tuple[dict[str, float], dict]:
    """-> (metrics, settings); both go to `workdir/eval.json`. Samples: `per_class` of each class with
    guidance `cfg` (default: the run's sample.cfg) and again with cfg = 0, keys image_keys(seed, c, i)."""
    t0 = time.time()
    builtin_score.check_per_class(per_class)
    check_settings(builtin_score.DEFAULT_CFG if cfg is None else cfg, top_k, top_p, prefix='')  # None: the run's
    info = check_workdir(workdir)
    if inception is not None and not os.path.isfile(inception):
        raise ValueError(f'--inception {inception}: no such file (pt_inception-2015-12-05-6726825d.pth)')
    cfg = info['cfg'] if cfg is None else float(cfg)
    data = info['data']

    import jax  # noqa: PLC0415  (after the inputs are known good)

    from var_jax.io import checkpoint  # noqa: PLC0415

    timings = {}

    def timed(name, fn, *args, **kw):
        t = time.time()
        result = fn(*args, **kw)
        timings[name] = round(time.time() - t, 1)
        if verbose:
            print(f'[eval] {name}: {timings[name]:.0f} s', file=sys.stderr, flush=True)
        return result

    vqvae, var = timed('load', checkpoint.open_checkpoint(workdir).load)
    train, train_labels, train_src = timed('read training images', load_split, data, 'train')
    held_out = has_held_out(data)
    test, test_labels, _ = timed('read held-out images', load_split, data, 'eval') if held_out \
        else (train, train_labels, None)
    k = train_src.num_classes
    if var.config.num_classes < k:
        raise ValueError(f'{workdir}: the VAR has {var.config.num_classes} classes, the folder {k}')
    judge = timed('judge', get_judge, workdir, train, train_labels, train_src, verbose=verbose)

    labels = np.repeat(np.arange(k, dtype=np.int32), per_class)
    index = np.tile(np.arange(per_class, dtype=np.int32), k)
    sample_args = dict(top_k=top_k, top_p=top_p, seed=seed)
    test_f = test.astype(np.float32) / 255
    sets = {'guided': timed('guided samples', builtin_score._samples, var, vqvae, labels, index, cfg=cfg,
                            **sample_args),
            'unguided': timed('unguided samples', builtin_score._samples, var, vqvae, labels, index, cfg=0.0,
                              **sample_args),
            'recon': timed('reconstructions', builtin_score._reconstructions, vqvae, test_f)}
    feats_only = {'train_vs_test': train.astype(np.float32) / 255,
                  'baseline_class_means': np.repeat(np.stack(
                      [train[train_labels == c].mean(0) if (train_labels == c).any() else train.mean(0)
                       for c in range(k)]).astype(np.float32) / 255, per_class, axis=0)}

    t = time.time()
    ref, ref_logits = judge.outputs(small(test))
    judge.test_acc = float(np.mean(ref_logits.argmax(-1) == test_labels))
    out = {'eval/classifier_test_acc': judge.test_acc}
    for name, images in {**sets, **feats_only}.items():
        feats, logits = judge.outputs(small(np.round(images * 255).astype(np.uint8)))
        if name in sets:
            want = test_labels if name == 'recon' else labels
            out[f'eval/{name}_class_acc'] = float(np.mean(logits.argmax(-1) == want))
        out[f'eval/fd_{name}'] = builtin_score.frechet_distance(feats, ref)
    timings['judging'] = round(time.time() - t, 1)
    if inception is not None:
        out.update(timed('inception', _inception_metrics, inception, test,
                         {'guided': sets['guided'], 'recon': sets['recon']}))

    settings = {'per_class': per_class, 'samples': len(labels), 'cfg': cfg, 'top_k': int(top_k),
                'top_p': float(top_p), 'seed': seed, 'image_size': int(test.shape[1]), 'classes': k,
                'class_names': list(train_src.class_names), 'folder': data.get('path'),
                'train_images': len(train_labels), 'reference': (f'held-out ({len(test_labels)} images)' if held_out
                                                                 else f'the training images ({len(test_labels)}; '
                                                                 'no held-out split)'),
                'judge': {'test_acc': judge.test_acc, 'train_seconds': round(judge.train_seconds, 1),
                          'cached': judge.cached},
                'seconds': round(time.time() - t0, 1), 'timings': timings}
    if jax.process_index() == 0:
        builtin_score._write_json(epath.Path(workdir) / builtin_score.EVAL_FILE, {**out, 'settings': settings})
    return out, settings


# ---------------------------------------------------------------------------- report
# the built-in score's rows, read against the held-out images (no noise baseline), and the Inception ones
ROWS = tuple((key, label.replace('real test images', 'held-out real images'), kind)
             for key, label, kind in builtin_score.ROWS if key != 'eval/fd_baseline_noise') + (
    ('eval/fid_guided', 'FID (Inception), guided samples', 'f'),
    ('eval/kid_guided', 'KID x 1e3 (Inception), guided samples', 'f'),
    ('eval/fid_recon', 'FID (Inception), reconstructions', 'f'),
    ('eval/kid_recon', 'KID x 1e3 (Inception), reconstructions', 'f'))


def report(results: dict[str, float], settings: dict | None = None) -> str:
    """The built-in score's table (its rows, read against the held-out images), under a line
    naming the folder, and a warning when the judge itself is unreliable."""
    head = []
    if settings:
        k = settings['classes']
        head = [f'folder score of {settings["folder"]} ({k} classes, {settings["train_images"]} training '
                f'images; reference: {settings["reference"]}): {settings["samples"]} samples '
                f'({settings["per_class"]} per class), cfg {settings["cfg"]:g}, top_k {settings["top_k"]}, '
                f'top_p {settings["top_p"]:g}, seed {settings["seed"]}; chance accuracy is {100 / k:.1f} %']
    acc = results.get('eval/classifier_test_acc')
    note = [f'note: the judge is right on only {100 * acc:.0f} % of held-out real images; sample accuracies are '
            'only as trustworthy as that (more images per class help)'] if acc is not None and acc < 0.8 else []
    return '\n'.join(head + builtin_score.format_rows(results, ROWS) + note)


def run(workdir, *, per_class: int | None = None, cfg: float | None = None, top_k: int = 0, top_p: float = 0.0,
        seed: int = 0, inception: str | None = None) -> dict[str, float]:
    """Print the score of `workdir` (the `evaluate --workdir` mode and the end of a folder run): the
    one in eval.json when it was measured with these settings on the latest checkpoint, else a new
    one. `per_class` None: the run's `score_per_class`."""
    config = builtin_score._read_json(epath.Path(workdir) / 'config.json', 'config.json') \
        if (epath.Path(workdir) / 'config.json').exists() else {}
    if per_class is None:
        per_class = int(config.get('score_per_class') or 50)
    if cfg is None:
        cfg = (config.get('sample') or {}).get('cfg', builtin_score.DEFAULT_CFG)
    stored = None if inception else builtin_score.stored_score(workdir, per_class=per_class, cfg=cfg, top_k=top_k,
                                                                top_p=top_p, seed=seed)
    path = epath.Path(workdir) / builtin_score.EVAL_FILE
    if stored is not None:
        settings = json.loads(path.read_text())['settings']
        print(report(stored, settings), flush=True)
        print(f'(measured earlier, from {path})', flush=True)
        return stored
    results, settings = score(workdir, per_class=per_class, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed,
                              inception=inception)
    print(report(results, settings), flush=True)
    print(f'written to {path} ({settings["seconds"]:.0f} s)', flush=True)
    return results


def for_run(config, workdir, *, complete: bool) -> dict[str, float]:
    """The end-of-training score of a folder run (train.py); a finished run rerun prints the stored one."""
    del complete  # `run` reuses eval.json whenever it is newer than the latest checkpoint
    s = config.sample
    return run(workdir, per_class=config.get('score_per_class', 50), cfg=s.cfg, top_k=s.top_k, top_p=s.top_p,
               seed=s.seed)
