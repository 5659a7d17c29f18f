"""Sharding on 8 fake CPU devices: rules, direct placement, and equality with one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models
from models.llama import with_sharding
from models.placement import forward_shard
from models.sharding import ShardingContext, compiler_options, logical_to_spec, make_mesh
from tests.models.oracle import hf_logits, make_hf_checkpoint, max_rel_err

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_make_mesh_parses_sizes_and_fills_minus_one():
    mesh = make_mesh("data=2,tensor=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh("data=2,fsdp=2,tensor=2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh("data=3,fsdp=2")
    with pytest.raises(ValueError, match="bad mesh spec"):
        make_mesh("pipeline=2")


def test_rules_replicate_dimensions_that_do_not_divide():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor")
    # SmolLM2 has 3 KV heads: tensor=2 cannot split them, so that dimension is replicated.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh) == P("fsdp")
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"))


@pytest.mark.parametrize("spec, shape", [("data=2,fsdp=2,tensor=2", (8, 4)), ("fsdp=2,tensor=4", (8, 4)),
                                         ("fsdp=2,tensor=4", (8, 3)), ("fsdp=8", (4, 4))])
def test_shards_is_how_many_pieces_jax_cuts_the_array_into(spec, shape):
    ctx = ShardingContext(make_mesh(spec))
    axes = ("batch", "act_heads")
    x = jax.device_put(np.zeros(shape, np.float32), ctx.sharding(axes, shape))
    per_device = {s.data.size for s in x.addressable_shards}
    assert per_device == {x.size // ctx.shards(axes, shape)}


def test_compiler_options_change_nothing_off_tpu():
    # The TPU flag would be refused by the CPU compiler ("No such compile option"): off TPU nothing is set.
    mesh = make_mesh("fsdp=-1")
    assert compiler_options(None, windowed_einsum=False) is None
    assert compiler_options(mesh, windowed_einsum=False) is None
    assert compiler_options(mesh) is None
    step = jax.jit(lambda x: x * 2, compiler_options=compiler_options(mesh, windowed_einsum=False))
    np.testing.assert_array_equal(step(jnp.arange(8.0)), np.arange(8.0) * 2)
    with pytest.raises(Exception, match="No such compile option"):  # why the CPU gets none
        jax.jit(lambda x: x * 2, compiler_options={"xla_tpu_enable_windowed_einsum_for_all_gather": False})(jnp.arange(8.0))


def test_sharded_forward_on_2x2x2_mesh_equals_single_device(tmp_path):
    hf = make_hf_checkpoint(str(tmp_path), vocab_size=128, num_attention_heads=4, num_key_value_heads=2)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    _, single = models.load_model(str(tmp_path))
    _, sharded = models.load_model(str(tmp_path), mesh=mesh)

    q = sharded.layers[0].attn.q_proj_dnh.value
    assert q.sharding.spec == P("fsdp", "tensor")
    # Each device holds only its quarter of the projection: nothing was placed whole first.
    assert {s.data.shape for s in q.addressable_shards} == {(32, 2, 16)}

    tokens = np.random.default_rng(0).integers(0, 128, size=(8, 24))
    batch_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.device_put(jnp.asarray(tokens), batch_sharding)

    graphdef, state = nnx.split(sharded)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    out = fwd(state, x)
    ref = single(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert max_rel_err(out, hf_logits(hf, tokens)) < 1e-4


def test_a_forward_split_by_rows_alone_matches_hugging_face(tmp_path):
    hf = make_hf_checkpoint(str(tmp_path), vocab_size=128, num_attention_heads=4, num_key_value_heads=2)
    _, sharded = models.load_model(str(tmp_path), mesh=make_mesh("data=2,fsdp=2,tensor=2"))
    rows = with_sharding(sharded, sharded.shard.rows_only())
    assert dict(rows.layers[1].mlp.shard.rules)["batch"] == ("data", "fsdp", "tensor")
    assert dict(rows.layers[1].mlp.shard.rules)["act_mlp"] is None
    assert sharded.layers[1].mlp.shard is sharded.shard  # the original is left as it was
    assert rows.layers[0].attn.q_proj_dnh.value is sharded.layers[0].attn.q_proj_dnh.value  # same arrays

    tokens = np.random.default_rng(1).integers(0, 128, size=(8, 24))
    x = jax.device_put(jnp.asarray(tokens), rows.shard.sharding(("batch", "length")))
    assert {s.data.shape for s in x.addressable_shards} == {(1, 24)}  # one row per device
    graphdef, state = nnx.split(rows)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, x)
    assert max_rel_err(out, hf_logits(hf, tokens)) < 1e-4


def test_a_forward_is_split_by_rows_alone_when_that_moves_fewer_bytes():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model = models.create_model(models.get_config("tiny"), seed=0, mesh=mesh)
    # By hand: P = 106,816 parameters; tensor parallelism moves 4·L·(rows/dp)·T·D = 4·2·(8/4)·T·64
    # = 1,024·T elements, so 8 rows go by rows alone from T = 105 (107,520 > 106,816) on.
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == 106_816
    assert forward_shard(model, 8, 104) is model.shard
    assert forward_shard(model, 8, 105) == model.shard.rows_only()
    assert forward_shard(model, 12, 4096) is model.shard  # 12 rows do not split over 8 devices
    flat = models.create_model(models.get_config("tiny"), seed=0, mesh=make_mesh("data=2,fsdp=4"))
    assert forward_shard(flat, 8, 4096) is flat.shard  # no tensor axis: nothing to trade
    assert forward_shard(models.create_model(models.get_config("tiny"), seed=0), 8, 4096) is None


def test_create_model_on_mesh_initialises_parameters_already_sharded():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model = models.create_model(models.get_config("tiny"), seed=0, mesh=mesh)
    w = model.layers[1].mlp.down_proj_fd.value
    assert w.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in w.addressable_shards} == {(64, 32)}
    reference = models.create_model(models.get_config("tiny"), seed=0)
    # same values as an unsharded init (eager vs jitted initialiser math may differ by an ulp)
    np.testing.assert_allclose(np.asarray(w), np.asarray(reference.layers[1].mlp.down_proj_fd.value), rtol=1e-6, atol=1e-7)
