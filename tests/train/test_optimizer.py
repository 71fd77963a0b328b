"""Optimiser: schedules, per-group learning rates, weight-decay mask, no state for frozen weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from speechlm_jax.configs import asr, salad
from speechlm_jax.models.layers import Linear, RMSNorm
from speechlm_jax.models.lora import LoRAConfig, apply_lora
from speechlm_jax.train import optimizer, partitions


class _Part(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = Linear(4, 6, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.norm = RMSNorm(6)


class _Toy(nnx.Module):
    """Three parts with the SpeechLM's top-level names, so paths give the groups."""

    def __init__(self, rngs: nnx.Rngs):
        self.encoder = _Part(rngs)
        self.projector = _Part(rngs)
        self.llm = _Part(rngs)


def _toy_config(schedule="constant"):
    config = salad.get_config("tiny")
    config.optimizer.schedule = schedule
    config.optimizer.warmup_steps = 0
    config.optimizer.weight_decay = 0.0
    config.optimizer.clip_norm = 0.0
    config.train.steps = 100
    return config


def test_warmup_cosine_matches_its_formula():
    config = asr.get_config("tiny")
    opt = config.optimizer
    opt.warmup_steps, opt.min_lr_ratio = 10, 0.1
    schedule = optimizer.make_schedule(opt, 1e-3, 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    for step in (30, 60, 110):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert float(schedule(step)) == pytest.approx(1e-4 + (1e-3 - 1e-4) * cosine, rel=1e-5)


def test_warmup_stable_decay_shape():
    opt = asr.get_config("tiny").optimizer
    opt.schedule, opt.warmup_steps, opt.decay_fraction, opt.min_lr_ratio = "warmup_stable_decay", 10, 0.2, 0.0
    schedule = optimizer.make_schedule(opt, 2e-3, 100)
    assert float(schedule(5)) == pytest.approx(1e-3)
    assert [float(schedule(s)) for s in (10, 50, 80)] == pytest.approx([2e-3] * 3)
    assert float(schedule(90)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    # The last step at the peak: the checkpoint SALAD's stage 2 continues from.
    assert optimizer.decay_start(opt, 100) == 80
    assert float(schedule(81)) < 2e-3


def test_decay_start_only_for_warmup_stable_decay():
    opt = asr.get_config("tiny").optimizer
    opt.schedule, opt.warmup_steps, opt.decay_fraction = "warmup_cosine", 10, 0.2
    assert optimizer.decay_start(opt, 100) is None
    opt.schedule, opt.warmup_steps = "warmup_stable_decay", 95
    assert optimizer.decay_start(opt, 100) == 95  # never inside the warmup


def test_groups_get_their_own_learning_rate_and_frozen_gets_no_state():
    model = _Toy(nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=r"llm/proj"), rngs=nnx.Rngs(1))
    config = _toy_config()
    config.train.trainable = "projector,lora"
    config.optimizer.lr.projector, config.optimizer.lr.lora = 1e-3, 5e-5
    _, trainable, frozen = nnx.split(model, nnx.Any(nnx.LoRAParam, nnx.PathContains("projector")), ...)
    tx, _ = optimizer.make_optimizer(config)
    state = tx.init(trainable)
    # Adam state holds exactly the trainable arrays (twice: mu and nu), nothing of the frozen base.
    trainable_size = sum(x.size for x in jax.tree.leaves(trainable))
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * trainable_size
    assert sum(x.size for x in jax.tree.leaves(frozen)) > 0

    grads = jax.tree.map(lambda x: jnp.ones_like(x), trainable)
    updates, _ = tx.update(grads, state, trainable)
    # The first Adam step moves every parameter by lr * g / |g| (bias-corrected): its group's lr.
    labels = partitions.group_labels(trainable)
    for (path, update), label in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(labels)):
        expected = {"projector": 1e-3, "lora": 5e-5}[label]
        np.testing.assert_allclose(np.abs(np.asarray(update)), expected, rtol=1e-4, err_msg=str(path))


def test_weight_decay_skips_norms_and_biases():
    model = _Toy(nnx.Rngs(0))
    config = _toy_config()
    config.train.trainable = "projector"
    config.optimizer.weight_decay = 0.5
    _, trainable, _ = nnx.split(model, nnx.PathContains("projector"), ...)
    tx, _ = optimizer.make_optimizer(config)
    zero_grads = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zero_grads, tx.init(trainable), trainable)
    flat = {jax.tree_util.keystr(p): np.asarray(u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    kernel = [v for k, v in flat.items() if "kernel" in k][0]
    lr = config.optimizer.lr.projector
    np.testing.assert_allclose(kernel, -lr * 0.5 * np.asarray(trainable["projector"]["proj"]["kernel"][...]), rtol=1e-6)
    for name, update in flat.items():
        if "bias" in name or "norm" in name:
            assert not update.any(), name


def test_clipping_bounds_the_global_norm():
    model = _Toy(nnx.Rngs(0))
    config = _toy_config()
    config.train.trainable = "projector"
    config.optimizer.clip_norm = 1.0
    config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.0, 0.0, 1.0
    _, trainable, _ = nnx.split(model, nnx.PathContains("projector"), ...)
    tx, _ = optimizer.make_optimizer(config)
    big = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), trainable)
    updates, _ = tx.update(big, tx.init(trainable), trainable)
    # Clipped to global norm 1, every gradient entry is 1/sqrt(n); with b1 = b2 = 0 Adam's
    # update is -lr * g / (|g| + eps), so the clip is visible through eps = 1.
    n = sum(x.size for x in jax.tree.leaves(trainable))
    g = 1.0 / math.sqrt(n)
    lr = config.optimizer.lr.projector
    for update in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(update), -lr * g / (g + 1.0), rtol=1e-5)
