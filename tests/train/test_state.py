"""`train.state.build_state`: the one place a run's state is built, real or abstract, and its batch check."""

from __future__ import annotations

import jax
import pytest

from speechlm_jax.configs import asr
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import compile_aot, state, trainer
from speechlm_jax.train import config as config_lib

BATCH_ERROR = (
    r"train\.batch_size=6 must divide into 8 "
    r"\(batch shards of mesh \{'data': 4, 'fsdp': 2, 'tensor': 1\} x train\.grad_accum\)"
)


def _config(**train):
    config = asr.get_config("tiny")
    config.model.frozen_dtype = "bfloat16"  # the cast must come out alike, real and abstract
    config.train.fast_compile = True
    config.train.update(train)
    return config


def _described(tree):
    """(structure, [(shape, dtype, sharding)]) of a tree of arrays or ShapeDtypeStructs."""
    return jax.tree.structure(tree), [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree)]


def test_real_state_and_the_compile_inputs_have_the_same_partitions_and_shardings():
    """The trainer, restore and conversion build the real state; `speechlm-compile` the abstract one: they agree."""
    config = _config()
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    real = state.build_state(config, mesh, for_training=True)
    _, (trainable, frozen, opt_state, _, _) = compile_aot.train_step_and_inputs(
        config, mesh, compile_aot.abstract_batch(config)
    )
    for built, compiled in ((real.trainable, trainable), (real.frozen, frozen), (real.opt_state, opt_state)):
        assert _described(built) == _described(compiled)
    assert {x.dtype for x in jax.tree.leaves(real.frozen)} == {jax.numpy.dtype("bfloat16")}
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(real.frozen))
    abstract = state.build_state(config, mesh, abstract=True, for_training=True)
    for name in ("trainable_shardings", "frozen_shardings", "opt_shardings"):
        assert getattr(real, name) == getattr(abstract, name), name
    # Only a state for training carries an optimiser state (restore and conversion do without).
    plain = state.build_state(config, mesh, abstract=True)
    assert plain.opt_state is None and plain.opt_shardings is None
    assert _described(plain.trainable) == _described(abstract.trainable)


def test_abstract_state_reads_no_weights():
    config = _config()
    config.model.llm_weights = "/nonexistent/llm"
    built = state.build_state(config, make_mesh({"data": 1}, jax.devices()[:1]), abstract=True, for_training=True)
    leaves = jax.tree.leaves((built.trainable, built.frozen, built.opt_state))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_batch_shard_error_names_the_numbers():
    config = _config(batch_size=6)
    mesh = make_mesh({"data": 4, "fsdp": 2}, jax.devices())
    assert state.batch_shards(mesh, config_lib.sharding_rules(config)) == 8
    with pytest.raises(config_lib.ConfigError, match=BATCH_ERROR):
        state.build_state(config, mesh, abstract=True, for_training=True)
    with pytest.raises(config_lib.ConfigError, match=BATCH_ERROR):
        compile_aot.train_step_and_inputs(config, mesh, compile_aot.abstract_batch(config))
    # Reading a run's model (evaluation, export) runs no step: any mesh will do.
    state.build_state(config, mesh, abstract=True)


def test_the_trainer_refuses_a_batch_that_does_not_divide_over_its_mesh(tiny_config, tmp_path):
    config = tiny_config("asr", batch_size=6)
    config.mesh.data, config.mesh.fsdp = 4, 2
    with pytest.raises(config_lib.ConfigError, match=BATCH_ERROR):
        trainer.train(config, tmp_path)
