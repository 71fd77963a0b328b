"""The jitted step: gradients only for the trainable partition, frozen base untouched, accumulation, skipping."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from speechlm_jax.configs import salad
from speechlm_jax.losses.chunked import chunked_cross_entropy, chunked_kl_distillation, chunked_salad_objective
from speechlm_jax.losses.common import gather_teacher
from speechlm_jax.losses.ctc import ctc_loss
from speechlm_jax.models.frontend import audio_token_count
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import build, objectives, optimizer, partitions, step
from speechlm_jax.train import config as config_lib

B, L, T, U = 4, 16000, 32, 24


def synthetic_batch(seed: int = 0, vocab: int = 64) -> dict[str, np.ndarray]:
    """A CONTRACT batch: one audio slot per row, text before and after it, the same supervised span in every row."""
    rng = np.random.default_rng(seed)
    frames = audio_token_count(L, 4)
    audio_index = np.full((B, T), -1, np.int32)
    audio_index[:, 4 : 4 + frames] = np.arange(frames)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - 10 :] = 1.0
    kl_mask = np.zeros((B, T), np.float32)
    kl_mask[:, 4 + frames :] = 1.0
    teacher_index = np.where(kl_mask > 0, np.arange(T) - frames + 4, 0).astype(np.int32)
    return {
        "audio": (rng.standard_normal((B, 1, L)) * 3000).astype(np.int16),
        "audio_lens": np.full((B, 1), L, np.int32),
        "tokens": rng.integers(5, vocab, (B, T)).astype(np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "input_mask": np.ones((B, T), np.int32),
        "audio_index": audio_index,
        "targets": rng.integers(5, vocab, (B, T)).astype(np.int32),
        "loss_mask": loss_mask,
        "teacher_tokens": rng.integers(5, vocab, (B, U)).astype(np.int32),
        "teacher_positions": np.tile(np.arange(U, dtype=np.int32), (B, 1)),
        "teacher_input_mask": np.ones((B, U), np.int32),
        "teacher_targets": rng.integers(5, vocab, (B, U)).astype(np.int32),
        "teacher_loss_mask": np.ones((B, U), np.float32),
        "kl_mask": kl_mask,
        "teacher_index": teacher_index,
        "weight": np.ones((B,), np.float32),
        "task_id": np.zeros((B,), np.int32),
        "audio_labels": np.where(np.arange(frames + 1) < 5, rng.integers(5, vocab, (B, 1, frames + 1)), -1).astype(
            np.int32
        ),
    }


@pytest.fixture(scope="module")
def parts():
    """(graphdef, trainable, frozen, config) of the tiny SALAD model, built once for the module."""
    config = salad.get_config("tiny")
    config.loss.alpha = 0.5
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    model = build.build_model(
        config, mesh, config_lib.sharding_rules(config), compiler_options=step.compiler_options(True)
    )
    graphdef, trainable, frozen = partitions.split_model(model, config_lib.trainable_groups(config))
    return graphdef, trainable, frozen, config


def _step(parts, grad_accum: int = 1, skip: bool = False):
    graphdef, _, _, config = parts
    tx, schedules = optimizer.make_optimizer(config)
    fn = step.train_step_fn(
        graphdef, objectives.make_objective(config.loss), tx, schedules, grad_accum=grad_accum, skip_nonfinite=skip
    )
    return tx, jax.jit(fn, compiler_options=step.compiler_options(True))


def test_only_trainable_parameters_change_and_frozen_is_bitwise_unchanged(parts):
    _, trainable, frozen, _ = parts
    tx, train_step = _step(parts)
    assert {partitions.param_group(p, v) for p, v in nnx.to_flat_state(trainable)} == {"projector", "lora"}
    before = jax.tree.map(np.array, (trainable, frozen))
    opt_state = tx.init(trainable)
    batch = synthetic_batch()
    new_trainable = trainable
    # Step 0 has learning rate 0 (warmup) and LoRA's B starts at 0 (A gets no gradient until B moves): 3 steps.
    for i in range(3):
        new_trainable, opt_state, metrics = train_step(new_trainable, frozen, opt_state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
    assert {"salad/kl", "salad/nll", "grad_norm", "lr/projector", "lr/lora"} <= set(metrics)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen), before[1])
    changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), new_trainable, before[0])
    assert all(jax.tree.leaves(changed))


def test_teacher_gets_no_gradient(parts):
    graphdef, trainable, frozen, _ = parts
    batch = synthetic_batch()

    def teacher_loss(frozen_state):
        model = nnx.merge(graphdef, trainable, frozen_state)
        return chunked_kl_distillation(
            jax.lax.stop_gradient(model.student_hidden(batch)),
            gather_teacher(model.teacher_hidden(batch), batch["teacher_index"]),
            jax.lax.stop_gradient(model.llm.unembedding()),
            batch["kl_mask"],
            chunk_size=16,
        )[0]

    grads = jax.jit(jax.grad(teacher_loss), compiler_options=step.compiler_options(True))(frozen)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_gradient_accumulation_equals_the_full_batch(parts):
    _, trainable, frozen, _ = parts
    tx, full_step = _step(parts)
    _, accum_step = _step(parts, grad_accum=2)
    batch = synthetic_batch()
    full = full_step(trainable, frozen, tx.init(trainable), batch, jax.random.key(0))
    accumulated = accum_step(trainable, frozen, tx.init(trainable), batch, jax.random.key(0))
    np.testing.assert_allclose(float(accumulated[2]["loss"]), float(full[2]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(accumulated[2]["grad_norm"]), float(full[2]["grad_norm"]), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
        accumulated[0],
        full[0],
    )


def test_nonfinite_step_is_skipped_when_asked(parts):
    _, trainable, frozen, _ = parts
    tx, train_step = _step(parts, skip=True)
    batch = synthetic_batch()
    batch["weight"] = np.full((B,), np.nan, np.float32)
    batch["loss_mask"][:] = 1.0
    opt_state = tx.init(trainable)
    before = jax.tree.map(np.array, (trainable, opt_state))
    new_trainable, new_opt_state, metrics = train_step(trainable, frozen, opt_state, batch, jax.random.key(0))
    assert float(metrics["finite"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, (new_trainable, new_opt_state)), before)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_step_equals_the_plain_step(parts, remat):
    """Activation checkpointing inside the jitted, differentiated step changes no number."""
    _, trainable, frozen, config = parts
    remat_config = config.copy_and_resolve_references()
    remat_config.model.remat = remat
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    model = build.build_model(
        remat_config, mesh, config_lib.sharding_rules(remat_config), compiler_options=step.compiler_options(True)
    )
    remat_graphdef, _, _ = partitions.split_model(model, config_lib.trainable_groups(remat_config))
    batch, rng = synthetic_batch(), jax.random.key(0)
    results = []
    for graphdef in (parts[0], remat_graphdef):
        tx, train_step = _step((graphdef, trainable, frozen, config))
        results.append(train_step(trainable, frozen, tx.init(trainable), batch, rng))
    (plain, _, plain_metrics), (rematted, _, remat_metrics) = results
    np.testing.assert_allclose(float(remat_metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(remat_metrics["grad_norm"]), float(plain_metrics["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(rematted), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_ctc_objective_reads_the_projector_frames_through_the_llm_head(parts):
    graphdef, trainable, frozen, config = parts
    cfg = config.loss.copy_and_resolve_references()
    cfg.name, cfg.blank_id = "ctc", 0
    objective = objectives.make_objective(cfg)
    batch = synthetic_batch()
    batch["weight"][-1] = 0.0  # a padding row does not count

    def loss_of(trainable_state):
        return objective(nnx.merge(graphdef, trainable_state, frozen), batch)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(trainable)
    model = nnx.merge(graphdef, trainable, frozen)
    embeds, mask = model.encode_audio(batch["audio"][:, 0], batch["audio_lens"][:, 0])
    logits = model.llm.logits(model.llm.norm(embeds))
    expected, _ = ctc_loss(logits, mask, batch["audio_labels"][:, 0], blank_id=0, weights=batch["weight"])
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(metrics["ctc/utterances"]) == B - 1 and float(metrics["ctc/tokens"]) == 5 * (B - 1)
    projector = [g for p, g in nnx.to_flat_state(grads) if partitions.param_group(p, g) == "projector"]
    assert projector and any(np.asarray(g[...] if hasattr(g, "value") else g).any() for g in projector)


def test_loss_options_reach_the_chunked_losses(parts):
    graphdef, trainable, frozen, config = parts
    model, batch = nnx.merge(graphdef, trainable, frozen), synthetic_batch()
    hidden, unembedding = model.student_hidden(batch), model.llm.unembedding()
    softcap = model.llm.config.final_logit_softcapping
    cfg = config.loss.copy_and_resolve_references()
    cfg.name, cfg.label_smoothing, cfg.z_loss = "cross_entropy", 0.1, 1e-3
    loss, metrics = objectives.make_objective(cfg)(model, batch)
    expected, _ = chunked_cross_entropy(
        hidden,
        unembedding,
        batch["targets"],
        batch["loss_mask"],
        chunk_size=cfg.chunk_size,
        softcap=softcap,
        weights=batch["weight"],
        label_smoothing=0.1,
        z_loss=1e-3,
    )
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    assert float(metrics["cross_entropy/z_loss"]) > 0
    cfg.name = "behavior_imitation"
    assert "behavior_imitation/z_loss" in objectives.make_objective(cfg)(model, batch)[1]
    cfg.z_loss = 0.0
    assert "behavior_imitation/z_loss" not in objectives.make_objective(cfg)(model, batch)[1]

    cfg.name, cfg.direction, cfg.jsd_beta = "salad", "jsd", 0.3
    loss, _ = objectives.make_objective(cfg)(model, batch)
    expected, _ = chunked_salad_objective(
        hidden,
        gather_teacher(model.teacher_hidden(batch), batch["teacher_index"]),
        unembedding,
        batch["targets"],
        batch["kl_mask"],
        batch["loss_mask"],
        alpha=cfg.alpha,
        chunk_size=cfg.chunk_size,
        temperature=cfg.temperature,
        direction="jsd",
        jsd_beta=0.3,
        softcap=softcap,
        weights=batch["weight"],
    )
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


@pytest.mark.parametrize("name", ["salad", "cross_entropy"])
def test_objectives_give_the_chunked_losses_values_and_gradients_under_jit(parts, name):
    """The fused objective's loss and gradients, of the trainable partition and of the frozen base
    (the head included, as when the LLM trains), equal the chunked forms' computed by autodiff."""
    graphdef, trainable, frozen, config = parts
    batch = synthetic_batch()
    cfg = config.loss.copy_and_resolve_references()
    cfg.name, cfg.chunk_size, cfg.temperature, cfg.label_smoothing, cfg.z_loss = name, 5, 1.5, 0.1, 1e-3
    objective = objectives.make_objective(cfg)

    def fused_loss(trainable_state, frozen_state):
        return objective(nnx.merge(graphdef, trainable_state, frozen_state), batch)[0]

    def chunked_loss(trainable_state, frozen_state):
        model = nnx.merge(graphdef, trainable_state, frozen_state)
        hidden, unembedding = model.student_hidden(batch), model.llm.unembedding()
        common = dict(chunk_size=5, softcap=model.llm.config.final_logit_softcapping, weights=batch["weight"])
        if name == "cross_entropy":
            return chunked_cross_entropy(
                hidden, unembedding, batch["targets"], batch["loss_mask"], label_smoothing=0.1, z_loss=1e-3, **common
            )[0]
        teacher = jax.lax.stop_gradient(model.teacher_hidden(batch))
        return chunked_salad_objective(
            hidden,
            gather_teacher(teacher, batch["teacher_index"]),
            unembedding,
            batch["targets"],
            batch["kl_mask"],
            batch["loss_mask"],
            alpha=cfg.alpha,
            temperature=1.5,
            direction=cfg.direction,
            jsd_beta=cfg.jsd_beta,
            **common,
        )[0]

    options = step.compiler_options(True)
    got, got_grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)), compiler_options=options)(
        trainable, frozen
    )
    want, want_grads = jax.jit(jax.value_and_grad(chunked_loss, argnums=(0, 1)), compiler_options=options)(
        trainable, frozen
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    got_leaves, want_leaves = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    assert len(got_leaves) == len(want_leaves) and any(np.asarray(g).any() for g in got_leaves)
    for g, w in zip(got_leaves, want_leaves):
        scale = float(np.max(np.abs(np.asarray(w)), initial=0.0))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * max(scale, 1.0))
