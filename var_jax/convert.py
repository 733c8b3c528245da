"""Official VAR checkpoints (PyTorch state dicts) -> var_jax models / Orbax checkpoints.

    python -m var_jax.convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out DIR

Model configs are inferred from tensor shapes (depth, width, heads, shared AdaLN, vocabulary,
classes, channel multipliers, Phi sharing; `patch_nums` from the `lvl_1L` buffer or the
sequence length). Layout changes: Linear W -> W.T, Conv OIHW -> HWIO, the qkv matrix to
(C, 3, H, D). Buffers (`lvl_1L`, `attn_bias_for_masking`, `zero_k_bias`, `ema_vocab_hit_SV`) are
dropped and recomputed. Unknown, missing or mis-shaped keys raise `ValueError` naming the key.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Any

import numpy as np
from flax import nnx

from var_jax.models import (PATCH_NUMS_256, PATCH_NUMS_512, VAR, VQVAE, VARConfig, VQVAEConfig, abstract,
                            check_pair)
from var_jax.state_dict import load_state_dict

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


def _indices(sd: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _fill(abstract_model: nnx.Module, flat: dict[Path, tuple[str, np.ndarray]], what: str) -> nnx.Module:
    """Put converted arrays into an abstract model, checking coverage and shapes."""
    graphdef, state = nnx.split(abstract_model)
    targets = dict(nnx.to_flat_state(state))
    for path, (key, arr) in flat.items():
        if path not in targets:
            raise ValueError(f'{what}: unexpected key {key!r} for this architecture')
        want = tuple(targets[path].shape)
        if tuple(arr.shape) != want:
            raise ValueError(f'{what}: key {key!r} has shape {tuple(arr.shape)}, expected {want} '
                             '(checkpoint from another model?)')
    missing = [p for p in targets if p not in flat]
    if missing:
        raise ValueError(f'{what}: checkpoint is missing {len(missing)} parameter(s), first: '
                         f'{".".join(map(str, missing[0]))}')
    for path, (_, arr) in flat.items():
        targets[path].set_value(np.asarray(arr, np.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(targets))


# ---------------------------------------------------------------------------- VQVAE
def vqvae_config_from_state(sd: dict[str, np.ndarray], patch_nums=None, **overrides) -> VQVAEConfig:
    emb = _require(sd, 'quantize.embedding.weight', 'VQVAE')
    conv_in = _require(sd, 'encoder.conv_in.weight', 'VQVAE')
    ch = conv_in.shape[0]
    levels = _indices(sd, r'^encoder\.down\.(\d+)\.')
    if not levels:
        raise ValueError('not a VQVAE state dict: no encoder.down.* keys')
    ch_mult = tuple(int(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch) for i in levels)
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
        using_mid_sa='encoder.mid.attn_1.qkv.weight' in sd,
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


def vqvae_from_state(sd: dict[str, np.ndarray], cfg: VQVAEConfig | None = None) -> VQVAE:
    check_finite(sd, lambda k: k in VAE_BUFFERS, 'VQVAE')
    cfg = cfg or vqvae_config_from_state(sd)
    flat = {}
    for key, arr in sd.items():
        if key in VAE_BUFFERS:
            continue
        path, val = _vqvae_path(key, arr)
        flat[path] = (key, val)
    return _fill(abstract(cfg), flat, 'VQVAE')


# ---------------------------------------------------------------------------- VAR
def _patch_nums_from_levels(lvl: np.ndarray) -> tuple[int, ...]:
    counts = np.bincount(np.asarray(lvl).reshape(-1))
    pns = tuple(int(round(math.sqrt(c))) for c in counts)
    if any(p * p != c for p, c in zip(pns, counts)):
        raise ValueError(f'lvl_1L buffer does not describe square scales: counts {counts.tolist()}')
    return pns


def var_config_from_state(sd: dict[str, np.ndarray], patch_nums=None, **overrides) -> VARConfig:
    pos = _require(sd, 'pos_1LC', 'VAR')
    c = int(_require(sd, 'pos_start', 'VAR').shape[-1])
    L = int(pos.shape[1])
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
    l2 = 'blocks.0.attn.scale_mul_1H11' in sd
    heads = int(sd['blocks.0.attn.scale_mul_1H11'].shape[1]) if l2 else c // 64
    hidden = int(_require(sd, 'blocks.0.ffn.fc1.weight', 'VAR').shape[0])
    kw = dict(
        depth=depth, width=0 if c == 64 * depth else c, num_heads=0 if heads == depth else heads,
        mlp_ratio=hidden / c, num_classes=int(_require(sd, 'class_emb.weight', 'VAR').shape[0]) - 1,
        vocab_size=int(_require(sd, 'head.weight', 'VAR').shape[0]),
        cvae=int(_require(sd, 'word_embed.weight', 'VAR').shape[1]), patch_nums=tuple(patch_nums),
        shared_aln='shared_ada_lin.1.weight' in sd, attn_l2_norm=l2)
    kw.update(overrides)
    return VARConfig(**kw)


def _var_entry(key: str, arr: np.ndarray, cfg: VARConfig) -> tuple[Path, int | None, np.ndarray]:
    """Official key -> (path in var_jax, block index or None, converted array)."""
    c, h = cfg.C, cfg.H
    m = re.match(r'^blocks\.(\d+)\.(.+)$', key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        table = {
            'attn.mat_qkv.weight': (('attn', 'mat_qkv'), lambda a: a.T.reshape(c, 3, h, c // h)),
            'attn.q_bias': (('attn', 'q_bias'), lambda a: a.reshape(h, c // h)),
            'attn.v_bias': (('attn', 'v_bias'), lambda a: a.reshape(h, c // h)),
            'attn.scale_mul_1H11': (('attn', 'scale_mul'), lambda a: a.reshape(-1)),
            'attn.proj.weight': (('attn', 'proj', 'kernel'), np.transpose),
            'attn.proj.bias': (('attn', 'proj', 'bias'), None),
            'ffn.fc1.weight': (('ffn', 'fc1', 'kernel'), np.transpose),
            'ffn.fc1.bias': (('ffn', 'fc1', 'bias'), None),
            'ffn.fc2.weight': (('ffn', 'fc2', 'kernel'), np.transpose),
            'ffn.fc2.bias': (('ffn', 'fc2', 'bias'), None),
            'ada_lin.1.weight': (('ada_lin', 'kernel'), np.transpose),
            'ada_lin.1.bias': (('ada_lin', 'bias'), None),
            'ada_gss': (('ada_gss',), lambda a: a.reshape(6, -1)),
        }
        if rest not in table:
            raise ValueError(f'VAR: unexpected key {key!r}')
        path, fn = table[rest]
        return ('blocks',) + path, i, arr if fn is None else fn(arr)
    table = {
        'pos_start': (('pos_start',), None), 'pos_1LC': (('pos_1LC',), None),
        'word_embed.weight': (('word_embed', 'kernel'), np.transpose), 'word_embed.bias': (('word_embed', 'bias'), None),
        'class_emb.weight': (('class_emb', 'embedding'), None), 'lvl_embed.weight': (('lvl_embed', 'embedding'), None),
        'shared_ada_lin.1.weight': (('shared_ada_lin', 'kernel'), np.transpose),
        'shared_ada_lin.1.bias': (('shared_ada_lin', 'bias'), None),
        'head_nm.ada_lin.1.weight': (('head_nm', 'ada_lin', 'kernel'), np.transpose),
        'head_nm.ada_lin.1.bias': (('head_nm', 'ada_lin', 'bias'), None),
        'head.weight': (('head', 'kernel'), np.transpose), 'head.bias': (('head', 'bias'), None),
    }
    if key not in table:
        raise ValueError(f'VAR: unexpected key {key!r}')
    path, fn = table[key]
    return path, None, arr if fn is None else fn(arr)


def var_from_state(sd: dict[str, np.ndarray], cfg: VARConfig | None = None) -> VAR:
    check_finite(sd, VAR_BUFFERS.match, 'VAR')
    cfg = cfg or var_config_from_state(sd)
    if 'lvl_1L' in sd and _patch_nums_from_levels(sd['lvl_1L']) != tuple(cfg.patch_nums):
        raise ValueError(f'VAR: lvl_1L describes patch_nums {_patch_nums_from_levels(sd["lvl_1L"])}, '
                         f'config has {cfg.patch_nums}')
    flat: dict[Path, tuple[str, np.ndarray]] = {}
    per_block: dict[Path, dict[int, tuple[str, np.ndarray]]] = {}
    for key, arr in sd.items():
        if VAR_BUFFERS.match(key):
            continue
        path, i, val = _var_entry(key, np.asarray(arr, np.float32), cfg)
        if i is None:
            flat[path] = (key, val)
        else:
            per_block.setdefault(path, {})[i] = (key, val)
    model = abstract(cfg)
    targets = dict(nnx.to_flat_state(nnx.state(model)))
    for path, blocks in per_block.items():
        for i, (key, val) in blocks.items():
            if path not in targets:
                raise ValueError(f'VAR: unexpected key {key!r} for this architecture')
            if i >= cfg.depth or val.shape != tuple(targets[path].shape[1:]):
                raise ValueError(f'VAR: key {key!r} has shape {val.shape}, expected '
                                 f'{tuple(targets[path].shape[1:])} (checkpoint from another model?)')
        missing = sorted(set(range(cfg.depth)) - set(blocks))
        example = next(iter(blocks.values()))[0]
        if missing:
            key = re.sub(r'^blocks\.\d+\.', f'blocks.{missing[0]}.', example)
            raise ValueError(f'VAR: checkpoint is missing key {key!r}')
        flat[path] = (re.sub(r'^blocks\.\d+\.', 'blocks.*.', example),
                      np.stack([blocks[i][1] for i in range(cfg.depth)]))
    return _fill(model, flat, 'VAR')


# ---------------------------------------------------------------------------- public API
def load_official(vae_path, var_path=None, patch_nums=None):
    """Official `.pth` / `.npz` / `.safetensors` files -> (VQVAE, VAR or None), float32 NNX modules."""
    var_sd = None if var_path is None else load_state_dict(var_path)
    var = None
    if var_sd is not None:
        var = var_from_state(var_sd, var_config_from_state(var_sd, patch_nums))
        patch_nums = var.config.patch_nums
    vae_sd = load_state_dict(vae_path)
    vqvae = vqvae_from_state(vae_sd, vqvae_config_from_state(vae_sd, patch_nums))
    if var is not None:
        check_pair(vqvae.config, var.config)
    return vqvae, var


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m var_jax.convert', description=__doc__.split('\n\n')[0])
    p.add_argument('--vae', required=True, help='official VQVAE weights (vae_ch160v4096z32.pth)')
    p.add_argument('--var', help='official VAR weights (var_d16.pth ... var_d36.pth)')
    p.add_argument('--out', required=True, help='output directory (an Orbax model checkpoint)')
    p.add_argument('--patch_nums', help='comma-separated scales, if they cannot be inferred')
    p.add_argument('--force', action='store_true',
                   help='replace --out if it is a previous converted checkpoint (never any other directory)')
    args = p.parse_args(argv)
    from var_jax import checkpoint  # noqa: PLC0415  (keeps `load_official` free of Orbax)
    try:
        checkpoint.check_model_output(args.out, overwrite=args.force)  # before any work: nothing lost
        pns = tuple(int(x) for x in args.patch_nums.split(',')) if args.patch_nums else None
        vqvae, var = load_official(args.vae, args.var, pns)
        checkpoint.save_model(args.out, vqvae=vqvae, var=var, overwrite=args.force,
                              source={'vae': args.vae, 'var': args.var})
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    n = lambda m: sum(x.size for x in __import__('jax').tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    msg = f'wrote {args.out}: VQVAE {n(vqvae):,} params'
    if var is not None:
        c = var.config
        msg += f', VAR d{c.depth} ({n(var):,} params, shared_aln={c.shared_aln}, patch_nums={c.patch_nums})'
    print(msg)
    return 0


if __name__ == '__main__':
    sys.exit(main())
