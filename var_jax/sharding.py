"""Mesh construction and logical-axis sharding.

Model code names axes logically (parameters carry `axes` metadata such as ('layers', 'embed',
'mlp'); activations are constrained with `constrain(x, ('batch', None, 'heads', None))`).
This file alone decides how those names map onto the physical mesh ('data', 'fsdp', 'tensor').
Outside `use_mesh(...)` every constraint is a no-op, so the models run unchanged on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),  # FSDP: every weight is split over its model-width dimension
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('classes', None),
    ('head_dim', None),
    ('layers', None),
)

_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar('var_jax_rules', default=None)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh over ('data', 'fsdp', 'tensor'); one size may be -1 = all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f'at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}')
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f'mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}')
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f'{len(devices)} devices cannot be split into a mesh with fixed sizes {sizes}')
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs '
                         f'{math.prod(sizes)} devices, {len(devices)} available')
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Activate `mesh` (jax.set_mesh) and the logical rules used by `constrain`/`logical_to_spec`."""
    token = _RULES.set(dict(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def logical_to_spec(axes: Sequence[str | None] | None, rules: dict | None = None, mesh: Mesh | None = None) -> P:
    """Logical axis names -> PartitionSpec. A mesh axis is used at most once per array and only
    where it has size > 1 (so the same rules serve every mesh shape)."""
    rules = _RULES.get() if rules is None else rules
    if axes is None or rules is None:
        return P()
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    out = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = tuple(t for t in targets if t not in used and (sizes is None or sizes.get(t, 1) > 1))
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
    rules = _RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh))
