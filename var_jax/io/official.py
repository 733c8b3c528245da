"""Official VAR checkpoints (PyTorch state dicts) -> var_jax models.

`python -m var_jax.convert` writes them as an Orbax model checkpoint (`convert`, below).
Model configs are inferred from tensor shapes (depth, width, heads, shared AdaLN, vocabulary,
classes, channel multipliers, Phi sharing; `patch_nums` from the `lvl_1L` buffer or the
sequence length). Layout changes: Linear W -> W.T, Conv OIHW -> HWIO, the qkv matrix to
(C, 3, H, D). Buffers (`lvl_1L`, `attn_bias_for_masking`, `zero_k_bias`, `ema_vocab_hit_SV`) are
dropped and recomputed. Unknown, missing or mis-shaped keys raise `ValueError` naming the
official key (and both shapes, in the official layout); each architecture dimension is read from
several keys and the majority wins, so one damaged key is reported as itself. NaN / Inf weights
are refused. `convert(..., force=True)` replaces only a previous converted checkpoint
(model.json and params/), never another directory (var_jax.io.outputs).
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from var_jax.io import checkpoint
from var_jax.io.state_dict import load_state_dict
from var_jax.models import PATCH_NUMS_256, PATCH_NUMS_512, VAR, VQVAE, VARConfig, VQVAEConfig, abstract, check_pair

VAE_BUFFERS = ('quantize.ema_vocab_hit_SV',)
VAR_BUFFERS = re.compile(r'^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$')
Path = tuple[Any, ...]


# ---------------------------------------------------------------------------- helpers
def check_finite(sd: dict, skip, what: str) -> None:
    """Refuse NaN / Inf weights (a diverged run, a damaged download): converted, they would
    sample a garbage grid with exit code 0. Buffers (`skip`) are exempt: the attention mask holds -inf."""
    bad = sorted(k for k, v in sd.items() if not skip(k) and np.issubdtype(np.asarray(v).dtype, np.inexact)
                 and not np.isfinite(np.asarray(v, np.float32)).all())
    if bad:
        shown = ', '.join(map(repr, bad[:5])) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise ValueError(f'{what}: non-finite (NaN or Inf) values in {shown}')


def _require(sd: dict, key: str, what: str) -> np.ndarray:
    if key not in sd:
        raise ValueError(f'not a {what} state dict: missing key {key!r}')
    return sd[key]


def _vote(sd: dict, what: str, *sources: tuple[str, int], extra: tuple[int, ...] = ()) -> int:
    """One config dimension read from several keys (key, axis): the most common value, ties going
    to the first source. A single mis-shaped key then cannot change the inferred architecture; it
    stays the odd one out and the shape check names it, instead of every key that depends on it."""
    values = [int(sd[k].shape[ax]) for k, ax in sources if k in sd and sd[k].ndim > ax] + list(extra)
    if not values:
        raise ValueError(f'not a {what} state dict: missing key {sources[0][0]!r}')
    return max(values, key=lambda v: (values.count(v), -values.index(v)))


def _indices(sd: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _shape_error(what: str, key: str, got, want) -> ValueError:
    return ValueError(f'{what}: key {key!r} has shape {tuple(got)}, expected {tuple(want)} '
                      '(checkpoint from another model?)')


def _missing_error(what: str, keys: list[str]) -> ValueError:
    shown = ', '.join(map(repr, keys[:5])) + (f' and {len(keys) - 5} more' if len(keys) > 5 else '')
    return ValueError(f'{what}: checkpoint is missing key{"s" if len(keys) > 1 else ""} {shown}')


def _fill(abstract_model: nnx.Module, flat: dict[Path, tuple[str, np.ndarray]], what: str,
          official_key, official_shape) -> nnx.Module:
    """Put converted arrays into an abstract model, checking coverage and shapes. Errors speak the
    official state dict's language: `official_key(path)` and `official_shape(path, shape)` map a
    var_jax parameter back to the key and shape the checkpoint should have held."""
    graphdef, state = nnx.split(abstract_model)
    targets = dict(nnx.to_flat_state(state))
    for path, (key, arr) in flat.items():
        if path not in targets:
            raise ValueError(f'{what}: unexpected key {key!r} for this architecture')
        want = tuple(targets[path].shape)
        if tuple(arr.shape) != want:
            raise _shape_error(what, key, official_shape(path, tuple(arr.shape)), official_shape(path, want))
    missing = [official_key(p) for p in targets if p not in flat]
    if missing:
        raise _missing_error(what, missing)
    for path, (_, arr) in flat.items():
        targets[path].set_value(np.asarray(arr, np.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(targets))


# ---------------------------------------------------------------------------- VQVAE
def vqvae_config_from_state(sd: dict[str, np.ndarray], patch_nums=None, **overrides) -> VQVAEConfig:
    emb = _require(sd, 'quantize.embedding.weight', 'VQVAE')
    _require(sd, 'encoder.conv_in.weight', 'VQVAE')
    ch = _vote(sd, 'VQVAE', ('encoder.conv_in.weight', 0), ('encoder.conv_in.bias', 0),
               ('encoder.down.0.block.0.conv1.weight', 1), ('encoder.down.0.block.0.norm1.weight', 0))
    levels = _indices(sd, r'^encoder\.down\.(\d+)\.')
    if not levels:
        raise ValueError('not a VQVAE state dict: no encoder.down.* keys')
    ch_mult = tuple(int(_require(sd, f'encoder.down.{i}.block.0.conv1.weight', 'VQVAE').shape[0] // ch) or 1
                    for i in levels)
    if any(k.startswith('quantize.quant_resi.qresi_ls.') for k in sd):
        share = len(_indices(sd, r'^quantize\.quant_resi\.qresi_ls\.(\d+)\.'))
    elif 'quantize.quant_resi.qresi.weight' in sd:
        share = 1
    else:
        share = 0
    quant_resi = 0.5 if any(k.startswith('quantize.quant_resi.') for k in sd) else 0.0
    if patch_nums is None:
        hits = sd.get('quantize.ema_vocab_hit_SV')
        patch_nums = PATCH_NUMS_256 if hits is None or hits.shape[0] == 10 else None
        if patch_nums is None:
            raise ValueError('cannot infer patch_nums of this tokenizer; pass patch_nums')
    kw = dict(
        vocab_size=int(emb.shape[0]), z_channels=int(emb.shape[1]), ch=int(ch), ch_mult=ch_mult,
        num_res_blocks=len(_indices(sd, r'^encoder\.down\.0\.block\.(\d+)\.')),
        using_sa=any(k.startswith(f'encoder.down.{levels[-1]}.attn.') for k in sd),
        using_mid_sa=any(k.startswith('encoder.mid.attn_1.') for k in sd),
        quant_conv_ks=int(_require(sd, 'quant_conv.weight', 'VQVAE').shape[-1]),
        quant_resi=quant_resi, share_quant_resi=share, patch_nums=tuple(patch_nums))
    kw.update(overrides)
    return VQVAEConfig(**kw)


def _vqvae_path(key: str, arr: np.ndarray) -> tuple[Path, np.ndarray]:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split('.')]
    # Phi convs: partially shared `qresi_ls.i`, fully shared `qresi`, or non-shared `i`
    if parts[:2] == ['quantize', 'quant_resi']:
        rest = parts[2:]
        if rest[0] == 'qresi_ls':
            rest = rest[1:]
        elif rest[0] == 'qresi':
            rest = [0] + rest[1:]
        parts = ['quantize', 'quant_resi'] + rest
    if parts == ['quantize', 'embedding', 'weight']:
        return ('quantize', 'embedding', 'embedding'), arr
    leaf = parts[-1]
    if leaf == 'weight' and arr.ndim == 4:
        return tuple(parts[:-1]) + ('kernel',), arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == 'weight' and arr.ndim == 1:
        return tuple(parts[:-1]) + ('scale',), arr  # GroupNorm
    return tuple(parts), arr


def _vqvae_key(path: Path, cfg: VQVAEConfig) -> str:
    """var_jax parameter path -> the official key (the inverse of `_vqvae_path`)."""
    parts = list(path)
    if parts == ['quantize', 'embedding', 'embedding']:
        return 'quantize.embedding.weight'
    if parts[-1] in ('kernel', 'scale'):
        parts[-1] = 'weight'
    if parts[:2] == ['quantize', 'quant_resi']:
        i, rest = parts[2], parts[3:]
        mid = (['qresi'] if cfg.share_quant_resi == 1 else [i] if cfg.share_quant_resi == 0
               else ['qresi_ls', i])
        parts = ['quantize', 'quant_resi', *mid, *rest]
    return '.'.join(map(str, parts))


def _vqvae_shape(path: Path, shape: tuple) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if path[-1] == 'kernel' and len(shape) == 4 else shape


def vqvae_from_state(sd: dict[str, np.ndarray], cfg: VQVAEConfig | None = None) -> VQVAE:
    check_finite(sd, lambda k: k in VAE_BUFFERS, 'VQVAE')
    cfg = cfg or vqvae_config_from_state(sd)
    flat = {}
    for key, arr in sd.items():
        if key in VAE_BUFFERS:
            continue
        path, val = _vqvae_path(key, arr)
        flat[path] = (key, val)
    return _fill(abstract(cfg), flat, 'VQVAE', lambda p: _vqvae_key(p, cfg), _vqvae_shape)


# ---------------------------------------------------------------------------- VAR
def _patch_nums_from_levels(lvl: np.ndarray) -> tuple[int, ...]:
    counts = np.bincount(np.asarray(lvl).reshape(-1))
    pns = tuple(int(round(math.sqrt(c))) for c in counts)
    if any(p * p != c for p, c in zip(pns, counts)):
        raise ValueError(f'lvl_1L buffer does not describe square scales: counts {counts.tolist()}')
    return pns


def var_config_from_state(sd: dict[str, np.ndarray], patch_nums=None, vocab_hint: int | None = None,
                          **overrides) -> VARConfig:
    """`vocab_hint`: the paired tokenizer's vocabulary, one more vote beside head.weight and head.bias."""
    pos = _require(sd, 'pos_1LC', 'VAR')
    c = int(_require(sd, 'pos_start', 'VAR').shape[-1])
    L = int(pos.shape[1])  # noqa: N806  (the sequence length L of the paper)
    depth = len(_indices(sd, r'^blocks\.(\d+)\.'))
    if depth == 0:
        raise ValueError('not a VAR state dict: no blocks.* keys')
    if patch_nums is None:
        if 'lvl_1L' in sd:
            patch_nums = _patch_nums_from_levels(sd['lvl_1L'])
        else:
            patch_nums = {680: PATCH_NUMS_256, 2240: PATCH_NUMS_512}.get(L)
            if patch_nums is None:
                raise ValueError(f'cannot infer patch_nums for sequence length {L}; pass patch_nums')
    if sum(p * p for p in patch_nums) != L:
        raise ValueError(f'patch_nums {tuple(patch_nums)} give L={sum(p * p for p in patch_nums)}, '
                         f'but pos_1LC has L={L}')
    blocks = _indices(sd, r'^blocks\.(\d+)\.')
    l2 = any(f'blocks.{i}.attn.scale_mul_1H11' in sd for i in blocks)
    heads = _vote(sd, 'VAR', *((f'blocks.{i}.attn.scale_mul_1H11', 1) for i in blocks)) if l2 else c // 64
    _require(sd, 'blocks.0.ffn.fc1.weight', 'VAR')
    hidden = _vote(sd, 'VAR', *(src for i in blocks for src in ((f'blocks.{i}.ffn.fc1.weight', 0),
                                                               (f'blocks.{i}.ffn.fc1.bias', 0),
                                                               (f'blocks.{i}.ffn.fc2.weight', 1))))
    _require(sd, 'head.weight', 'VAR')
    vocab = _vote(sd, 'VAR', ('head.weight', 0), ('head.bias', 0), extra=() if vocab_hint is None else (vocab_hint,))
    kw = dict(
        depth=depth, width=0 if c == 64 * depth else c, num_heads=0 if heads == depth else heads,
        mlp_ratio=hidden / c, num_classes=int(_require(sd, 'class_emb.weight', 'VAR').shape[0]) - 1,
        vocab_size=vocab,
        cvae=int(_require(sd, 'word_embed.weight', 'VAR').shape[1]), patch_nums=tuple(patch_nums),
        shared_aln='shared_ada_lin.1.weight' in sd, attn_l2_norm=l2)
    kw.update(overrides)
    return VARConfig(**kw)


# official key -> (var_jax path, conversion or None, var_jax shape -> official shape)
_T = np.transpose


def _rev(t):
    return t[::-1]


def _same(t):
    return t


VAR_BLOCK_RULES = {
    # (3C, C) -> (C, 3, H, D) and (C,) -> (H, D) need the head count: done in var_from_state
    'attn.mat_qkv.weight': (('attn', 'mat_qkv'), None, lambda t: (t[1] * t[2] * t[3], t[0])),
    'attn.q_bias': (('attn', 'q_bias'), None, lambda t: (t[0] * t[1],)),
    'attn.v_bias': (('attn', 'v_bias'), None, lambda t: (t[0] * t[1],)),
    'attn.scale_mul_1H11': (('attn', 'scale_mul'), lambda a: a.reshape(-1), lambda t: (1, t[0], 1, 1)),
    'attn.proj.weight': (('attn', 'proj', 'kernel'), _T, _rev),
    'attn.proj.bias': (('attn', 'proj', 'bias'), None, _same),
    'ffn.fc1.weight': (('ffn', 'fc1', 'kernel'), _T, _rev),
    'ffn.fc1.bias': (('ffn', 'fc1', 'bias'), None, _same),
    'ffn.fc2.weight': (('ffn', 'fc2', 'kernel'), _T, _rev),
    'ffn.fc2.bias': (('ffn', 'fc2', 'bias'), None, _same),
    'ada_lin.1.weight': (('ada_lin', 'kernel'), _T, _rev),
    'ada_lin.1.bias': (('ada_lin', 'bias'), None, _same),
    'ada_gss': (('ada_gss',), lambda a: a.reshape(6, -1), lambda t: (1, 1) + t),
}
VAR_TOP_RULES = {
    'pos_start': (('pos_start',), None, _same), 'pos_1LC': (('pos_1LC',), None, _same),
    'word_embed.weight': (('word_embed', 'kernel'), _T, _rev), 'word_embed.bias': (('word_embed', 'bias'), None, _same),
    'class_emb.weight': (('class_emb', 'embedding'), None, _same),
    'lvl_embed.weight': (('lvl_embed', 'embedding'), None, _same),
    'shared_ada_lin.1.weight': (('shared_ada_lin', 'kernel'), _T, _rev),
    'shared_ada_lin.1.bias': (('shared_ada_lin', 'bias'), None, _same),
    'head_nm.ada_lin.1.weight': (('head_nm', 'ada_lin', 'kernel'), _T, _rev),
    'head_nm.ada_lin.1.bias': (('head_nm', 'ada_lin', 'bias'), None, _same),
    'head.weight': (('head', 'kernel'), _T, _rev), 'head.bias': (('head', 'bias'), None, _same),
}


def _var_rule(key: str):
    """Official key -> (var_jax path, block index or None, conversion, target -> official shape)."""
    m = re.match(r'^blocks\.(\d+)\.(.+)$', key)
    rule = VAR_BLOCK_RULES.get(m.group(2)) if m else VAR_TOP_RULES.get(key)
    if rule is None:
        raise ValueError(f'VAR: unexpected key {key!r}')
    path, fn, back = rule
    return (('blocks',) + path, int(m.group(1)), fn, back) if m else (path, None, fn, back)


def _var_key(path: Path, i: int = 0) -> str:
    """var_jax parameter path -> the official key (block `i` for the stacked block parameters)."""
    if path[0] == 'blocks':
        return f'blocks.{i}.' + next(k for k, r in VAR_BLOCK_RULES.items() if r[0] == path[1:])
    return next(k for k, r in VAR_TOP_RULES.items() if r[0] == path)


def var_from_state(sd: dict[str, np.ndarray], cfg: VARConfig | None = None) -> VAR:
    check_finite(sd, VAR_BUFFERS.match, 'VAR')
    cfg = cfg or var_config_from_state(sd)
    if 'lvl_1L' in sd and _patch_nums_from_levels(sd['lvl_1L']) != tuple(cfg.patch_nums):
        raise ValueError(f'VAR: lvl_1L describes patch_nums {_patch_nums_from_levels(sd["lvl_1L"])}, '
                         f'config has {cfg.patch_nums}')
    h = cfg.H
    model = abstract(cfg)
    targets = dict(nnx.to_flat_state(nnx.state(model)))
    flat: dict[Path, tuple[str, np.ndarray]] = {}
    per_block: dict[Path, dict[int, tuple[str, np.ndarray]]] = {}
    for key, arr in sd.items():
        if VAR_BUFFERS.match(key):
            continue
        path, i, fn, back = _var_rule(key)
        if path not in targets:
            raise ValueError(f'VAR: unexpected key {key!r} for this architecture')
        if i is not None and i >= cfg.depth:
            raise ValueError(f'VAR: unexpected key {key!r}: the model has {cfg.depth} blocks')
        want = back(tuple(targets[path].shape)[1:] if i is not None else tuple(targets[path].shape))
        if tuple(arr.shape) != want:  # checked before any reshape, in the official layout
            raise _shape_error('VAR', key, arr.shape, want)
        val = np.asarray(arr, np.float32)
        if path == ('blocks', 'attn', 'mat_qkv'):
            val = val.T.reshape(cfg.C, 3, h, cfg.C // h)
        elif path in (('blocks', 'attn', 'q_bias'), ('blocks', 'attn', 'v_bias')):
            val = val.reshape(h, cfg.C // h)
        elif fn is not None:
            val = fn(val)
        if i is None:
            flat[path] = (key, val)
        else:
            per_block.setdefault(path, {})[i] = (key, val)
    missing = [_var_key(p, i) for p in targets for i in
               (range(cfg.depth) if p[0] == 'blocks' else [0])
               if (p[0] == 'blocks' and i not in per_block.get(p, {})) or (p[0] != 'blocks' and p not in flat)]
    if missing:
        raise _missing_error('VAR', missing)
    for path, blocks in per_block.items():
        flat[path] = (_var_key(path).replace('blocks.0.', 'blocks.*.'),
                      np.stack([blocks[i][1] for i in range(cfg.depth)]))
    return _fill(model, flat, 'VAR', _var_key, lambda p, t: t)


# ---------------------------------------------------------------------------- public API
def load_official(vae_path, var_path=None, patch_nums=None):
    """Official `.pth` / `.npz` / `.safetensors` files -> (VQVAE, VAR or None), float32 NNX modules."""
    var_sd = None if var_path is None else load_state_dict(var_path)
    vae_sd = load_state_dict(vae_path)
    var = None
    if var_sd is not None:
        emb = vae_sd.get('quantize.embedding.weight')
        hint = int(emb.shape[0]) if emb is not None and emb.ndim == 2 else None
        var = var_from_state(var_sd, var_config_from_state(var_sd, patch_nums, vocab_hint=hint))
        patch_nums = var.config.patch_nums
    vqvae = vqvae_from_state(vae_sd, vqvae_config_from_state(vae_sd, patch_nums))
    if var is not None:
        check_pair(vqvae.config, var.config)
    return vqvae, var


def convert(vae_path, var_path, out, *, patch_nums: str | None = None, force: bool = False) -> str:
    """Official files -> the Orbax model checkpoint `out` (what `python -m var_jax.convert` does);
    returns the one-line summary. `patch_nums`: comma-separated scales, if they cannot be inferred.
    `out` is checked before any work, so a refused output loses nothing."""
    checkpoint.check_model_output(out, overwrite=force)
    pns = tuple(int(x) for x in patch_nums.split(',')) if patch_nums else None
    vqvae, var = load_official(vae_path, var_path, pns)
    checkpoint.save_model(out, vqvae=vqvae, var=var, overwrite=force, source={'vae': vae_path, 'var': var_path})
    msg = f'wrote {out}: VQVAE {_num_params(vqvae):,} params'
    if var is not None:
        c = var.config
        msg += f', VAR d{c.depth} ({_num_params(var):,} params, shared_aln={c.shared_aln}, patch_nums={c.patch_nums})'
    return msg


def _num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
