"""`model.init_from`: a run's parts started from an earlier run's checkpoint, or a clear refusal."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import init_from, state, trainer


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_corpus, compilation_cache):
    """Two steps of `asr:tiny` training the projector and the encoder (what a connector-alignment run trains)."""
    from speechlm_jax.configs import asr

    config = asr.get_config(f"tiny,data_dir={tiny_corpus}")
    config.train.update(
        steps=2, progress_bar=False, eval_every=0, fast_compile=True, compilation_cache=str(compilation_cache)
    )
    config.train.trainable = "projector,encoder"
    config.model.lora.rank = 0
    config.checkpoint.async_save = False
    workdir = tmp_path_factory.mktemp("source")
    trainer.train(config, workdir)
    return workdir, config


def _target(source_config, workdir, parts):
    config = source_config.copy_and_resolve_references()
    config.seed = source_config.seed + 1  # another initialisation: only init_from can make the parts equal
    config.train.trainable = "projector"
    config.model.init_from.workdir = str(workdir)
    config.model.init_from.parts = parts
    return config


def _flat(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def test_parts_come_from_the_earlier_run_and_the_rest_from_the_config(source_run):
    workdir, source_config = source_run
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    trained = nnx.merge(
        *(lambda s: (s.graphdef, s.trainable, s.frozen))(state.build_state(source_config, mesh))
    )  # the source's initial values, for contrast
    source_trainable = init_from.source_trainable(_target(source_config, workdir, "projector"), mesh)
    built = state.build_state(_target(source_config, workdir, "projector,encoder"), mesh)
    model = nnx.merge(built.graphdef, built.trainable, built.frozen)
    for part in ("projector", "encoder"):
        expected = [np.asarray(x) for x in jax.tree.leaves(source_trainable[part])]
        got = _flat(getattr(model, part))
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), part
        # Two optimiser steps moved them away from the source's own initial values.
        assert not all(np.array_equal(a, b) for a, b in zip(got, _flat(getattr(trained, part)))), part
    # The LLM is this config's own (seeded differently), not the source's.
    assert not all(np.array_equal(a, b) for a, b in zip(_flat(model.llm), _flat(trained.llm)))


def test_a_part_of_another_shape_is_named_with_both_shapes(source_run):
    workdir, source_config = source_run
    config = _target(source_config, workdir, "projector")
    config.model.projector.downsample = 2 * source_config.model.projector.downsample
    with pytest.raises(
        init_from.InitFromError, match=r"projector/linear_1/kernel is \(\d+, \d+\) in .*, this model's is"
    ):
        state.build_state(config, make_mesh({"data": 1}, jax.devices()[:1]))


def test_an_unknown_part_and_a_missing_step_are_refused(source_run):
    workdir, source_config = source_run
    config = _target(source_config, workdir, "projector")
    config.model.init_from.parts = "projector,decoder"
    with pytest.raises(init_from.InitFromError, match="name some of projector, encoder"):
        init_from.parts(config)
    config.model.init_from.step = 7
    with pytest.raises(init_from.InitFromError, match=r"no checkpoint at step 7 .* saved steps: \[2\]"):
        init_from.source_trainable(config, make_mesh({"data": 1}, jax.devices()[:1]))


def test_connector_alignment_then_a_recipe_from_it(tmp_path, tiny_corpus, compilation_cache):
    """`align:tiny` (CTC through the frozen LLM's head) trains the connector and leaves the LLM as built;
    a recipe run then starts its projector and encoder from it and trains on."""
    from speechlm_jax.configs import align, asr

    config = align.get_config(f"tiny,data_dir={tiny_corpus}")
    config.train.update(
        steps=4, progress_bar=False, eval_every=0, fast_compile=True, compilation_cache=str(compilation_cache)
    )
    config.checkpoint.async_save = False
    config_lib.validate(config)
    result = trainer.train(config, tmp_path / "align")
    assert result.step == 4 and np.isfinite(result.metrics["ctc/loss"])
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    aligned = state.build_state(config, mesh)
    assert set(aligned.trainable) == {"encoder", "projector"}  # the LLM is in the frozen base

    recipe = asr.get_config(f"tiny,data_dir={tiny_corpus}")
    recipe.train.update(
        steps=2, progress_bar=False, eval_every=0, fast_compile=True, compilation_cache=str(compilation_cache)
    )
    recipe.checkpoint.async_save = False
    recipe.model.init_from.workdir = str(tmp_path / "align")
    recipe.model.init_from.parts = "projector,encoder"
    # The aligned connector has its learned CTC blank: a recipe without one is told which key to set.
    with pytest.raises(init_from.InitFromError, match=r"model\.projector\.ctc_blank=True"):
        state.build_state(recipe, mesh)
    recipe.model.projector.ctc_blank = True
    started = state.build_state(recipe, mesh)
    source = init_from.source_trainable(recipe, mesh)
    model = nnx.merge(started.graphdef, started.trainable, started.frozen)
    for part in ("projector", "encoder"):
        assert all(
            np.array_equal(a, np.asarray(b)) for a, b in zip(_flat(getattr(model, part)), jax.tree.leaves(source[part]))
        ), part
    assert trainer.train(recipe, tmp_path / "asr").step == 2


def test_a_part_taken_into_a_run_with_its_own_lora_keeps_fresh_adapters(source_run):
    """VoiceTextBlender adapts the encoder with LoRA: the taken encoder's base weights are the
    source's, and this run's adapters start fresh (B = 0, so each layer starts as the base)."""
    workdir, source_config = source_run
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    config = _target(source_config, workdir, "encoder")
    config.model.lora.rank, config.model.lora.encoder = 4, True
    config.train.trainable = "projector,lora"
    source = init_from.source_trainable(config, mesh)["encoder"]
    built = state.build_state(config, mesh)
    encoder = nnx.merge(built.graphdef, built.trainable, built.frozen).encoder
    from speechlm_jax.train import checkpoint

    own = {
        checkpoint.leaf_name(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(encoder, nnx.Param))[0]
    }
    taken = {checkpoint.leaf_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    adapters = sorted(k for k in own if k not in taken)
    assert adapters and all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in adapters)
    assert all(np.array_equal(own[k], taken[k]) for k in taken)
    assert all(not own[k].any() for k in adapters if k.endswith("lora_b"))
