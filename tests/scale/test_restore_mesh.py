"""A checkpoint saved on one mesh restores onto another (more or fewer devices, other axes).

The trainer's `Checkpointer` restores onto whatever shardings the target trees carry, so a
run may resume on a different number of hosts or mesh shape: saved on 4 devices
(fsdp 2 x tensor 2), restored on 8 (fsdp 2 x tensor 4) and on 2 (tensor 2), every array is
bitwise the saved one and sits in the new mesh's sharding.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
import pytest

from speechlm_jax.configs import asr
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import build, checkpoint, optimizer, partitions, step
from speechlm_jax.train import config as config_lib


def _state_on(config, mesh):
    """(trainable, opt_state) of the tiny recipe built in `mesh`'s shardings."""
    rules = config_lib.sharding_rules(config)
    model = build.build_model(config, mesh, rules, compiler_options=step.compiler_options(True))
    _, trainable, _ = partitions.split_model(model, config_lib.trainable_groups(config))
    tx, _ = optimizer.make_optimizer(config)
    opt_sh = partitions.shardings(jax.eval_shape(tx.init, trainable), mesh, rules)
    return trainable, jax.jit(tx.init, out_shardings=opt_sh)(trainable)


def _targets(config, mesh):
    """Abstract (trainable, opt_state) carrying `mesh`'s shardings: the restore targets."""
    rules = config_lib.sharding_rules(config)
    _, trainable, _ = partitions.split_model(build.abstract_model(config), config_lib.trainable_groups(config))
    tx, _ = optimizer.make_optimizer(config)
    opt_state = jax.eval_shape(tx.init, trainable)

    def place(tree):
        shardings = partitions.shardings(tree, mesh, rules)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    return place(trainable), place(opt_state)


def _data_iterator() -> grain.DatasetIterator:
    return iter(grain.MapDataset.range(16).to_iter_dataset())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny recipe's trainable and optimiser state, perturbed away from init, saved on 4 devices."""
    config = asr.get_config("tiny")
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    trainable, opt_state = _state_on(config, mesh)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(trainable))))
    # LoRA B starts at zero: move every value so a restore of the wrong data cannot pass.
    trainable = jax.tree.map(lambda x: x + jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    workdir = tmp_path_factory.mktemp("saved_on_4")
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1, async_save=False)
    ckpt.save(7, trainable, opt_state, {"base_hash": "h"}, _data_iterator())
    ckpt.close()
    assert any(
        len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(trainable)
    )
    return config, workdir, jax.device_get(trainable), jax.device_get(opt_state)


@pytest.mark.parametrize("mesh_shape, devices", [({"fsdp": 2, "tensor": 4}, 8), ({"tensor": 2}, 2)])
def test_restore_onto_another_mesh_equals_the_saved_state(saved, mesh_shape, devices):
    config, workdir, trainable, opt_state = saved
    mesh = make_mesh(mesh_shape, jax.devices()[:devices])
    target_trainable, target_opt = _targets(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1, async_save=False)
    restored_trainable, restored_opt, meta = ckpt.restore(
        ckpt.latest_step(), target_trainable, target_opt, _data_iterator()
    )
    ckpt.close()
    assert meta["step"] == 7
    for restored, saved_tree, target in (
        (restored_trainable, trainable, target_trainable),
        (restored_opt, opt_state, target_opt),
    ):
        assert jax.tree.structure(restored) == jax.tree.structure(saved_tree)
        for got, want, where in zip(
            jax.tree.leaves(restored), jax.tree.leaves(saved_tree), jax.tree.leaves(target), strict=True
        ):
            assert got.sharding == where.sharding
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    placed = [x for x in jax.tree.leaves(restored_trainable) if not x.sharding.is_fully_replicated]
    assert placed and all(x.sharding.mesh.devices.size == devices for x in placed)
