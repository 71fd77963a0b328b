"""SpecAugment in training (`model.spec_augment`): the train step masks each audio slot with its own
seed, evaluation never masks, and the masks do not depend on how the batch is split."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from speechlm_jax.configs import salad
from speechlm_jax.models.frontend import HOP_LENGTH, log_mel_spectrogram, spec_augment
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import build, objectives, optimizer, partitions, step
from speechlm_jax.train import config as config_lib
from tests.train.test_step import synthetic_batch

POLICY = dict(freq_masks=2, freq_width=20, time_masks=2, time_width=30)


def _parts(policy: dict[str, int] | None):
    config = salad.get_config("tiny")
    config.loss.alpha = 0.5
    if policy:
        config.model.spec_augment.update(policy)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    model = build.build_model(
        config, mesh, config_lib.sharding_rules(config), compiler_options=step.compiler_options(True)
    )
    graphdef, trainable, frozen = partitions.split_model(model, config_lib.trainable_groups(config))
    return graphdef, trainable, frozen, config


@pytest.fixture(scope="module")
def augmented():
    return _parts(POLICY)


@pytest.fixture(scope="module")
def plain():
    return _parts(None)


def _loss(parts, batch) -> float:
    graphdef, trainable, frozen, config = parts
    objective = objectives.make_objective(config.loss)
    return float(jax.jit(lambda b: objective(nnx.merge(graphdef, trainable, frozen), b)[0])(batch))


def test_the_step_masks_with_its_rng_and_evaluation_never_masks(augmented, plain):
    batch = synthetic_batch()
    seeded = step.with_augment_seeds(batch, jax.random.key(0))
    assert seeded["augment_seeds"].shape == batch["audio_lens"].shape
    # Same weights (same config seed): without seeds the policy is inert, so eval matches the plain model.
    assert _loss(augmented, batch) == _loss(plain, batch)
    assert _loss(plain, seeded) == _loss(plain, batch)  # no policy: the seeds are ignored
    masked = _loss(augmented, seeded)
    assert masked != _loss(augmented, batch)
    assert masked == _loss(augmented, step.with_augment_seeds(batch, jax.random.key(0)))
    assert masked != _loss(augmented, step.with_augment_seeds(batch, jax.random.key(1)))


def test_each_slot_is_masked_by_its_own_seed_alone(augmented):
    graphdef, trainable, frozen, _ = augmented
    model = nnx.merge(graphdef, trainable, frozen)
    batch = synthetic_batch()
    audio, lens = batch["audio"][:, 0], batch["audio_lens"][:, 0]
    seeds = np.asarray([5, 6, 7, 8], np.int32)
    whole = jax.jit(lambda a, n, s: model.project_audio(a, n, augment_seeds=s)[0])(audio, lens, seeds)
    pair = jax.jit(lambda a, n, s: model.project_audio(a, n, augment_seeds=s)[0])(audio[2:], lens[2:], seeds[2:])
    np.testing.assert_allclose(np.asarray(whole[2:]), np.asarray(pair), rtol=1e-5, atol=1e-6)
    # Row i is frontend.spec_augment of its own log-mel under jax.random.key(seed_i).
    mels = log_mel_spectrogram(audio[:1], n_mels=model.encoder.config.num_mel_bins)
    expected = spec_augment(mels, jax.random.key(5), lengths=lens[:1] // HOP_LENGTH, **POLICY)
    got = model.augment.rows(mels, lens[:1] // HOP_LENGTH, seeds[:1])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert (np.asarray(got) != np.asarray(mels)).any()


def test_accumulated_microbatches_are_masked_as_the_whole_batch(augmented):
    graphdef, trainable, frozen, config = augmented
    tx, schedules = optimizer.make_optimizer(config)
    objective = objectives.make_objective(config.loss)
    batch = synthetic_batch()
    results = []
    for accum in (1, 2):
        fn = step.train_step_fn(graphdef, objective, tx, schedules, grad_accum=accum)
        results.append(jax.jit(fn)(trainable, frozen, tx.init(trainable), batch, jax.random.key(3)))
    (full, accumulated) = results
    np.testing.assert_allclose(float(accumulated[2]["loss"]), float(full[2]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(accumulated[2]["grad_norm"]), float(full[2]["grad_norm"]), rtol=1e-5)


def test_a_negative_mask_count_is_refused():
    config = salad.get_config("tiny")
    config.model.spec_augment.time_masks = -1
    with pytest.raises(config_lib.ConfigError, match="model.spec_augment.time_masks"):
        config_lib.validate(config)
