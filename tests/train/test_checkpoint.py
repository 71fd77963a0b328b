"""Checkpoints: orbax round trip (parameters, optimiser, meta, Grain iterator), other-mesh restore, base hash."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from speechlm_jax.models.layers import Linear, RMSNorm
from speechlm_jax.models.lora import LoRAConfig, apply_lora
from speechlm_jax.sharding import DEFAULT_RULES, make_mesh
from speechlm_jax.train import checkpoint, partitions


class _Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = Linear(8, 16, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.norm = RMSNorm(16)


def _state(mesh):
    model = _Toy(nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4, alpha=4.0, targets="proj"), rngs=nnx.Rngs(1))
    _, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adamw(1e-2)
    trainable = jax.device_put(trainable, partitions.shardings(trainable, mesh, DEFAULT_RULES))
    opt_state = jax.jit(
        tx.init, out_shardings=partitions.shardings(jax.eval_shape(tx.init, trainable), mesh, DEFAULT_RULES)
    )(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, frozen


def _dataset():
    return grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset()


def test_round_trip_restores_state_rng_and_data_position_onto_another_mesh(tmp_path):
    devices = jax.devices()
    saved_trainable, saved_opt, _ = _state(make_mesh({"data": 1}, devices[:1]))
    iterator = iter(_dataset())
    for _ in range(3):
        next(iterator)
    rng = jax.random.key(7)
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
    assert ckpt.save(3, saved_trainable, saved_opt, {"rng": checkpoint.rng_to_meta(rng), "base_hash": "h"}, iterator)
    expected_next = next(iterator)
    ckpt.close()

    mesh = make_mesh({"fsdp": 2, "tensor": 4}, devices)
    target_trainable, target_opt, _ = _state(mesh)
    fresh_iterator = iter(_dataset())
    restorer = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
    assert restorer.latest_step() == 3
    trainable, opt_state, meta = restorer.restore(3, target_trainable, target_opt, fresh_iterator)
    restorer.close()

    np.testing.assert_array_equal(next(fresh_iterator), expected_next)
    assert meta["step"] == 3
    restored_rng = checkpoint.rng_from_meta(meta["rng"], jax.random.key(0))
    np.testing.assert_array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))
    for saved, restored, target in zip(
        jax.tree.leaves((saved_trainable, saved_opt)),
        jax.tree.leaves((trainable, opt_state)),
        jax.tree.leaves((target_trainable, target_opt)),
    ):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))
        assert restored.sharding == target.sharding
    lora_a = trainable["proj"]["lora_a"][...]
    assert lora_a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_keep_and_interval(tmp_path):
    trainable, opt_state, _ = _state(make_mesh({"data": 1}, jax.devices()[:1]))
    iterator = iter(_dataset())
    ckpt = checkpoint.Checkpointer(tmp_path, every=2, keep=2, async_save=False)
    saved = [
        step for step in range(1, 8) if ckpt.should_save(step) and ckpt.save(step, trainable, opt_state, {}, iterator)
    ]
    ckpt.close()
    assert saved == [2, 4, 6]
    assert sorted(ckpt.manager.all_steps()) == [4, 6]


def test_base_hash_sees_any_change_of_the_frozen_base():
    _, _, frozen = _state(make_mesh({"data": 1}, jax.devices()[:1]))
    reference = checkpoint.base_hash(frozen)
    assert checkpoint.base_hash(jax.tree.map(lambda x: x.copy(), frozen)) == reference
    changed = jax.tree.map(lambda x: x, frozen)
    kernel = changed["proj"]["kernel"]
    kernel.set_value(kernel[...].at[3, 5].add(1e-3))
    assert checkpoint.base_hash(changed) != reference
    with pytest.raises(checkpoint.BaseMismatchError, match="differ from those the checkpoint at step 5"):
        checkpoint.check_base({"step": 5, "base_hash": reference, "base_path": "a"}, checkpoint.base_hash(changed), "b")
    checkpoint.check_base({"step": 5, "base_hash": reference}, reference, "a")


@pytest.mark.parametrize("written_scanned", [False, True])
def test_a_checkpoint_of_the_other_layer_form_fails_naming_scan_layers(tmp_path, written_scanned):
    """Trainable LoRA of unrolled layers (`llm/layers/0/...`) does not restore into scanned ones
    (`llm/layers/...` stacked), nor the other way: the error names model.scan_layers."""
    from speechlm_jax.models.llm import DecoderLLM, LLMConfig

    def lora_state(scanned: bool) -> nnx.State:
        config = LLMConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            scan_layers=scanned,
        )
        model = DecoderLLM(config, rngs=nnx.Rngs(0))
        apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
        return nnx.State({"llm": nnx.state(model, nnx.LoRAParam)})

    import orbax.checkpoint as ocp

    item = tmp_path / "trainable"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(item, lora_state(written_scanned))
    checkpoint.check_fits(item, lora_state(written_scanned), context="its own config")
    with pytest.raises(checkpoint.CheckpointMismatchError, match=f"model.scan_layers={str(written_scanned).lower()}"):
        checkpoint.check_fits(item, lora_state(not written_scanned), context="the other form")
