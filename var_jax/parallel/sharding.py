"""Mesh construction and logical-axis sharding.

Model code names axes logically (parameters carry `axes` metadata such as ('layers', 'embed',
'mlp'); activations are constrained with `constrain(x, ('batch', None, 'heads', None))`).
This file alone decides how those names map onto the physical mesh ('data', 'fsdp', 'tensor').
Outside `use_mesh(...)` every constraint is a no-op, so the models run unchanged on one device.

The rules (logical name -> mesh axis, None, or a tuple of axes) are DEFAULT_RULES unless a run
overrides some of them (maxtext's `logical_axis_rules`: `config.mesh.logical_axis_rules`, checked by
`check_rules`). `make_mesh(..., logical_axis_rules=...)` records them as the rules of the mesh it
returns, so every function here given that mesh and no explicit `rules` uses them.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar('var_jax_rules', default=None)


# the rules each mesh was made with (make_mesh); JAX interns meshes, so the latest make_mesh of a
# device layout decides, and a mesh made elsewhere has DEFAULT_RULES
_MESH_RULES: dict[Mesh, tuple[tuple[str, Any], ...]] = {}


def check_rules(rules: Sequence = ()) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with `rules` in place of the defaults of the names they give; ValueError (one line)
    for an item that is not a (name, target) pair, an unknown logical name, a name given twice, or a
    target that is not None, a mesh axis or a tuple of distinct mesh axes."""
    where = 'mesh.logical_axis_rules'
    given: dict[str, Any] = {}
    for item in rules or ():
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f'{where}: each rule is a (logical name, mesh axis) pair, got {item!r}')
        name, target = item
        if name not in LOGICAL_AXES:
            raise ValueError(f'{where}: unknown logical axis {name!r} (known: {", ".join(LOGICAL_AXES)})')
        if name in given:
            raise ValueError(f'{where}: {name!r} is given twice')
        axes = (target,) if isinstance(target, str) else tuple(target) if isinstance(target, (tuple, list)) else None
        if axes is None and target is not None or axes is not None and not all(isinstance(a, str) for a in axes):
            raise ValueError(f'{where}: {name!r} maps to {target!r}; expected None, a mesh axis or a tuple of them')
        for a in axes or ():
            if a not in MESH_AXES:
                raise ValueError(f'{where}: unknown mesh axis {a!r} for {name!r} (mesh axes: {", ".join(MESH_AXES)})')
        if axes is not None and len(set(axes)) != len(axes):
            raise ValueError(f'{where}: {name!r} uses a mesh axis twice: {target!r}')
        given[name] = None if not axes else axes[0] if isinstance(target, str) else axes
    return tuple((name, given.get(name, default)) for name, default in DEFAULT_RULES)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """The checked rules of a run config (`config.mesh.logical_axis_rules`; DEFAULT_RULES without)."""
    return check_rules(config.mesh.get('logical_axis_rules', ()))


def rules_of(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """The rules `mesh` was made with (DEFAULT_RULES for a mesh not made by `make_mesh`)."""
    return _MESH_RULES.get(mesh, DEFAULT_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, num_devices: int = 0,
              logical_axis_rules: Sequence = ()) -> Mesh:
    """Mesh over ('data', 'fsdp', 'tensor'); one size may be -1 = all remaining devices.

    `num_devices` > 0 uses only the first that many devices (debugging, tests, benchmarks).
    `logical_axis_rules` (checked, over DEFAULT_RULES: `check_rules`) become the mesh's rules: the
    functions below use them when given this mesh and no explicit rules (the arguments are
    `config.mesh`, so a run's rules travel with its mesh)."""
    rules = check_rules(logical_axis_rules)
    devices = list(jax.devices() if devices is None else devices)
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f'mesh.num_devices={num_devices} but only {len(devices)} devices are available')
        devices = devices[:num_devices]
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
    mesh = Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    _MESH_RULES[mesh] = rules
    return mesh


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None):
    """Activate `mesh` (jax.set_mesh) and the logical rules used by `constrain`/`logical_to_spec`
    (default: the mesh's, `rules_of`)."""
    token = _RULES.set(dict(rules_of(mesh) if rules is None else rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def logical_to_spec(axes: Sequence[str | None] | None, rules: dict | None = None, mesh=None,
                    shape: Sequence[int] | None = None) -> P:
    """Logical axis names -> PartitionSpec.

    A mesh axis is used at most once per array, only where it has size > 1, and (given `shape`)
    only where it divides that dimension; otherwise the dimension stays replicated. So one set of
    rules serves every mesh shape and every model size.
    """
    rules = _RULES.get() if rules is None else rules
    if axes is None or rules is None:
        return P()
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep: list[str] = []
        for t in targets:
            n = 1 if sizes is None else sizes.get(t, 1)
            if t in used or n == 1:
                continue
            if shape is not None and shape[i] % (math.prod(sizes[k] for k in keep) * n):
                continue
            keep.append(t)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def _is_variable(x) -> bool:
    from flax import nnx  # noqa: PLC0415

    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None):
    """NamedShardings for an (abstract) nnx.State from each Variable's `axes` metadata (`rules`
    default: the mesh's).

    Variables stay as tree nodes (with the sharding as their value), so the result has exactly the
    tree structure of the state, as `jax.jit(out_shardings=...)` and Orbax need.
    """
    rules = dict(rules_of(mesh) if rules is None else rules)

    def one(v):
        if _is_variable(v):
            spec = logical_to_spec(v.get_metadata().get('axes'), rules, mesh, v.shape)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def like_params(tree, abstract_params, param_shardings, default: NamedSharding):
    """Shardings for a tree holding copies of the parameters (an optimizer state).

    A leaf whose key path ends with a parameter's key path, and has its shape, gets that
    parameter's sharding (Adam's mu and nu, EMA copies, also inside masked or multi_transform
    states where `optax.tree_map_params` cannot line the trees up); every other leaf (counts,
    scalars, factored statistics) gets `default`.
    """
    flat = jax.tree_util.tree_flatten_with_path
    shapes = {tuple(k): getattr(v, 'shape', None) for k, v in flat(abstract_params)[0]}
    shards = {tuple(k): v for k, v in flat(param_shardings)[0]}

    def one(path, leaf):
        for i in range(len(path)):
            tail = tuple(path[i:])
            if tail in shards:
                return shards[tail] if shapes[tail] == getattr(leaf, 'shape', None) else default
        return default

    return jax.tree_util.tree_map_with_path(one, tree)


def put(tree, shardings):
    """Place host values (identical on every process) as global arrays with these shardings.

    Going through numpy makes each process fill only its own shards; a `device_put` of a
    single-device array onto a sharding that spans processes would be a cross-host transfer,
    which CPU backends (multi-process tests) do not support.
    """
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), shardings), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
    rules = dict(rules_of(mesh) if rules is None else rules)
    return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules, mesh))


def data_parallel_size(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> int:
    """How many ways the batch is split (the product of the mesh axes 'batch' maps to)."""
    spec = logical_to_spec(('batch',), dict(rules_of(mesh) if rules is None else rules), mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
    rules = _RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh))
