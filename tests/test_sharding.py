"""The logical-axis sharding rules (var_jax/parallel/sharding.py): `logical_to_spec` on the default
rules and on an override, the fsdp / tensor / data mapping of a tiny VAR's real parameters, a
dimension its mesh axis does not divide, and the checks of `mesh.logical_axis_rules`.

Specs are computed against abstract meshes where no devices are needed, and against the 8 fake CPU
devices of conftest where a real mesh is (NamedSharding, the loop's `make_mesh(**config.mesh)`).
"""
from __future__ import annotations

import subprocess
import sys

import jax
import pytest
from conftest import REPO
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from var_jax.models import VARConfig, abstract
from var_jax.parallel import sharding
from var_jax.parallel.sharding import DEFAULT_RULES, check_rules, logical_to_spec
from var_jax.training import configs

DEFAULT = dict(DEFAULT_RULES)


def mesh_of(data=1, fsdp=1, tensor=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


# ---------------------------------------------------------------------------- logical_to_spec
def test_default_rules_map_names_to_mesh_axes():
    m = mesh_of(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(('batch', None, 'heads', None), DEFAULT, m) == P(('data', 'fsdp'), None, 'tensor', None)
    assert logical_to_spec(('embed', 'mlp'), DEFAULT, m) == P('fsdp', 'tensor')
    assert logical_to_spec(('mlp', 'embed'), DEFAULT, m) == P('tensor', 'fsdp')
    assert logical_to_spec(('layers', 'heads', 'head_dim'), DEFAULT, m) == P(None, 'tensor', None)
    assert logical_to_spec(('classes', 'embed'), DEFAULT, m) == P(None, 'fsdp')
    assert logical_to_spec(('embed', 'vocab'), DEFAULT, m) == P('fsdp', 'tensor')
    assert logical_to_spec(None, DEFAULT, m) == P(), 'no axes metadata: replicated'


def test_size_one_axes_and_reuse_drop_out():
    # a mesh axis of size 1 is never named (the same rules serve a data-parallel-only mesh)
    assert logical_to_spec(('batch', 'embed', 'mlp'), DEFAULT, mesh_of(data=8)) == P('data', None, None)
    assert logical_to_spec(('batch',), DEFAULT, mesh_of(fsdp=8)) == P('fsdp')
    # a mesh axis splits at most one dimension of an array
    assert logical_to_spec(('embed', 'embed'), DEFAULT, mesh_of(fsdp=4)) == P('fsdp', None)
    assert logical_to_spec(('batch', 'embed'), DEFAULT, mesh_of(data=2, fsdp=2)) == P(('data', 'fsdp'), None)
    # no mesh (sizes unknown): nothing is split
    assert logical_to_spec(('embed', 'heads'), DEFAULT) == P(None, None)


def test_a_dimension_the_mesh_axis_does_not_divide_stays_replicated():
    m = mesh_of(data=2, fsdp=4, tensor=2)
    assert logical_to_spec(('embed', 'mlp'), DEFAULT, m, shape=(6, 8)) == P(None, 'tensor')  # 6 % 4
    assert logical_to_spec(('embed', 'vocab'), DEFAULT, m, shape=(64, 63)) == P('fsdp', None)  # 63 % 2
    # ('data', 'fsdp') on 4 rows: data (2) divides it, data x fsdp (8) does not -> data only
    assert logical_to_spec(('batch', None), DEFAULT, m, shape=(4, 3)) == P('data', None)
    assert logical_to_spec(('batch', None), DEFAULT, m, shape=(16, 3)) == P(('data', 'fsdp'), None)


def test_an_override_replaces_only_the_names_it_gives():
    rules = check_rules((('embed', None), ('mlp', ('fsdp', 'tensor')), ('batch', 'data')))
    assert [name for name, _ in rules] == [name for name, _ in DEFAULT_RULES], 'every name, in the default order'
    r = dict(rules)
    assert r['embed'] is None and r['mlp'] == ('fsdp', 'tensor') and r['batch'] == 'data'
    assert {k: v for k, v in r.items() if k not in ('embed', 'mlp', 'batch')} == \
        {k: v for k, v in DEFAULT.items() if k not in ('embed', 'mlp', 'batch')}
    m = mesh_of(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(('embed', 'mlp'), r, m) == P(None, ('fsdp', 'tensor'))
    assert logical_to_spec(('batch', None), r, m) == P('data', None)
    assert check_rules(()) == DEFAULT_RULES and check_rules(None) == DEFAULT_RULES
    assert check_rules([['heads', []]])[2] == ('heads', None), 'lists (from JSON) and () = replicated'


# ---------------------------------------------------------------------------- a tiny VAR's parameters
TINY = VARConfig(depth=2, width=64, num_heads=2, num_classes=10, vocab_size=64, cvae=8, patch_nums=(1, 2, 4))


def param_specs(cfg: VARConfig, mesh, rules=None) -> dict[str, P]:
    shardings = sharding.state_shardings(nnx.state(abstract(cfg), nnx.Param), mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {'.'.join(str(k.key) for k in path): v.get_value().spec for path, v in leaves}


def test_tiny_var_parameters_on_fsdp_and_tensor():
    s = param_specs(TINY, sharding.make_mesh(data=1, fsdp=4, tensor=2))
    # FSDP splits every weight over its model-width dimension, tensor parallelism heads / mlp / vocab;
    # the stacked depth axis is never split
    assert s['blocks.attn.mat_qkv'] == P(None, 'fsdp', None, 'tensor', None)  # (depth, C, 3, H, C/H)
    assert s['blocks.attn.proj.kernel'] == P(None, 'tensor', 'fsdp')  # (depth, C, C): heads in, width out
    assert s['blocks.attn.q_bias'] == P(None, 'tensor', None)
    assert s['blocks.ffn.fc1.kernel'] == P(None, 'fsdp', 'tensor')
    assert s['blocks.ffn.fc2.kernel'] == P(None, 'tensor', 'fsdp')
    assert s['blocks.ffn.fc1.bias'] == P(None, 'tensor')
    assert s['blocks.ada_lin.kernel'] == P(None, 'fsdp', None)
    assert s['head.kernel'] == P('fsdp', 'tensor') and s['head.bias'] == P('tensor')
    assert s['class_emb.embedding'] == P(None, 'fsdp')
    assert s['pos_1LC'] == P(None, None, 'fsdp')
    assert s['head_nm.ada_lin.bias'] == P(None)


def test_tiny_var_parameters_data_parallel_only_are_replicated():
    s = param_specs(TINY, sharding.make_mesh(data=8))
    assert all(all(a is None for a in spec) for spec in s.values()), s


def test_tiny_var_with_an_indivisible_vocabulary_and_an_override():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    s = param_specs(TINY.replace(vocab_size=63), mesh)
    assert s['head.kernel'] == P('fsdp', None) and s['head.bias'] == P(None), '63 rows do not split over tensor=2'
    o = param_specs(TINY, mesh, check_rules((('embed', None),)))  # no FSDP: weights whole, tensor split kept
    assert o['blocks.ffn.fc1.kernel'] == P(None, None, 'tensor') and o['pos_1LC'] == P(None, None, None)


# ---------------------------------------------------------------------------- rules with the mesh
def test_make_mesh_records_the_rules_the_loop_then_uses():
    over = (('batch', 'data'), ('embed', None))
    mesh = sharding.make_mesh(data=2, fsdp=4, logical_axis_rules=over)
    try:
        assert sharding.rules_of(mesh) == check_rules(over)
        assert sharding.data_parallel_size(mesh) == 2, 'batch over data only'
        assert sharding.batch_sharding(mesh, ndim=2).spec == P('data', None)
        assert param_specs(TINY, mesh)['blocks.ffn.fc1.kernel'] == P(None, None, None)
        with sharding.use_mesh(mesh):  # the activations' constraints follow the same rules
            assert logical_to_spec(('batch', 'embed'), mesh=mesh) == P('data', None)
    finally:
        mesh = sharding.make_mesh(data=2, fsdp=4)  # the same device layout again: back to the defaults
    assert sharding.rules_of(mesh) == DEFAULT_RULES and sharding.data_parallel_size(mesh) == 8


def test_run_config_carries_the_rules():
    c = configs.var_recipe(depth=2, batch_size=8, epochs=1, tblr=1e-4, alng=1e-3, wpe=0.1)
    assert sharding.rules_from_config(c) == DEFAULT_RULES and c.mesh.logical_axis_rules == DEFAULT_RULES
    c.mesh.update(data=1, fsdp=8, logical_axis_rules=(('embed', 'tensor'),))
    mesh = sharding.make_mesh(**c.mesh)  # as the loop builds it
    try:
        assert dict(sharding.rules_of(mesh))['embed'] == 'tensor'
        c.mesh.logical_axis_rules = (('embd', None),)
        with pytest.raises(ValueError, match=r"^config: mesh.logical_axis_rules: unknown logical axis 'embd'"):
            configs.check(c, 'var')
    finally:
        sharding.make_mesh(data=1, fsdp=8)


@pytest.mark.parametrize('rules, match', [
    ((('embd', 'fsdp'),), r"unknown logical axis 'embd' \(known: batch, embed, heads, mlp, vocab, classes, "),
    ((('embed', 'fsdpp'),), r"unknown mesh axis 'fsdpp' for 'embed' \(mesh axes: data, fsdp, tensor\)"),
    ((('batch', ('data', 'model')),), "unknown mesh axis 'model' for 'batch'"),
    ((('embed', 'fsdp'), ('embed', None)), "'embed' is given twice"),
    (('embed:fsdp',), r"each rule is a \(logical name, mesh axis\) pair, got 'embed:fsdp'"),
    ((('embed', 'fsdp', 'tensor'),), 'each rule is a'),
    ((('embed', 3),), "'embed' maps to 3; expected None, a mesh axis or a tuple of them"),
    ((('batch', ('data', 'data')),), "'batch' uses a mesh axis twice"),
])
def test_bad_rules_are_one_line_errors(rules, match):
    with pytest.raises(ValueError, match=match) as e:
        check_rules(rules)
    assert str(e.value).startswith('mesh.logical_axis_rules: ') and '\n' not in str(e.value)
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(logical_axis_rules=rules)


def test_the_trainer_rejects_bad_rules_on_the_command_line(tmp_path):
    w = tmp_path / 'w'
    r = subprocess.run([sys.executable, '-m', 'var_jax.train', f'--config={REPO / "configs" / "tiny.py"}',
                        f'--workdir={w}', "--config.mesh.logical_axis_rules=(('embed', 'tensr'),)"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and "unknown mesh axis 'tensr'" in lines[0], r.stderr
    assert not w.exists()
