"""VAR models: the multi-scale VQVAE tokenizer and the VAR transformer.

`create(cls, cfg, seed)` is the one way to build fresh parameters: the constructor runs under a
single `jax.jit` (optionally with sharded outputs, so nothing is materialised on one device),
and `abstract(cls, cfg)` gives shapes/metadata without allocating anything.
"""
from __future__ import annotations

import functools
from typing import Any, TypeVar

import jax
from flax import nnx

from var_jax.models.config import (
    PATCH_NUMS,
    PATCH_NUMS_256,
    PATCH_NUMS_512,
    VARConfig,
    VQVAEConfig,
    check_pair,
    var_config,
    vqvae_config,
)
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE

M = TypeVar('M', bound=nnx.Module)

__all__ = ['VAR', 'VQVAE', 'VARConfig', 'VQVAEConfig', 'PATCH_NUMS', 'PATCH_NUMS_256', 'PATCH_NUMS_512',
           'var_config', 'vqvae_config', 'check_pair', 'create', 'abstract', 'model_class']


def model_class(cfg) -> type:
    return {VQVAEConfig: VQVAE, VARConfig: VAR}[type(cfg)]


@functools.lru_cache(maxsize=32)
def _abstract_split(cfg):
    # tracing the constructor costs ~1-2 s for large models; configs are frozen, so cache per config
    return nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))


def abstract(cfg) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` leaves (and their `axes` metadata); no allocation."""
    graphdef, state = _abstract_split(cfg)
    return nnx.merge(graphdef, state)


def _init_compiler_options() -> dict[str, Any] | None:
    # XLA:CPU spends ~1 s per random-number op at the default LLVM level (threefry is unrolled);
    # init runs once, so compile it at -O0. Other backends keep their defaults.
    return {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None


def create(cfg, seed: int = 0, *, out_shardings: Any = None) -> nnx.Module:
    """Fresh model with the official initialisation, built inside one jitted program.

    `out_shardings`: optional pytree of shardings matching `nnx.state(model)` (see
    `var_jax.parallel.sharding.state_shardings`), so large models are created already sharded.
    """
    cls = model_class(cfg)
    graphdef, _ = nnx.split(abstract(cfg))

    def init():
        return nnx.state(cls(cfg, rngs=nnx.Rngs(seed)))

    state = jax.jit(init, out_shardings=out_shardings, compiler_options=_init_compiler_options())()
    return nnx.merge(graphdef, state)
