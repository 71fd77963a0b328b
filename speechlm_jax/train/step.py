"""The jitted training and evaluation steps: pure functions of (trainable, frozen, opt_state, batch, rng).

    train_step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)

The model is rebuilt inside jit with `nnx.merge(graphdef, trainable, frozen)`; gradients
are taken with respect to `trainable` only (the closure holds `frozen` as a constant of
the differentiation), so the frozen base gets no gradient buffers and no optimiser state,
and it comes out of the step untouched. `trainable` and `opt_state` are donated: the step
updates them in place on device.

Gradient accumulation splits the batch into `grad_accum` microbatches and runs them under
`lax.scan`, summing gradients; microbatch `a` takes rows a, a + A, a + 2A, ... so that
every microbatch is spread over all data-parallel devices (a contiguous split would put a
whole microbatch on a few devices). The loss and gradient are the mean over microbatches,
each microbatch counting equally, as a data-parallel mean does.

Non-finite steps: the step always reports `finite` (loss and gradient norm finite). With
`skip_nonfinite` the update of a non-finite step is discarded inside the step (parameters
and optimiser state keep their previous values); otherwise the trainer stops the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from speechlm_jax.train.objectives import Objective

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _microbatches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B // count, ...] with microbatch a holding rows a, a + count, ..."""

    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def with_augment_seeds(batch: Batch, rng: jax.Array) -> Batch:
    """The batch with `augment_seeds` [B, S]: one seed per audio slot from the step's `rng`, which
    the model's SpecAugment masks that slot with (`SpeechLM.project_audio`; unused without a
    policy). Drawn for the whole batch before it is split into microbatches, so the masks do not
    depend on `train.grad_accum`. The eval step draws none: held-out audio is never masked."""
    if "audio_lens" not in batch:
        return batch
    seeds = jax.random.randint(rng, batch["audio_lens"].shape, 0, jnp.iinfo(jnp.int32).max, dtype=jnp.int32)
    return {**batch, "augment_seeds": seeds}


def loss_and_grads(
    graphdef: nnx.GraphDef, objective: Objective, trainable: Any, frozen: Any, batch: Batch, grad_accum: int
) -> tuple[jax.Array, Metrics, Any]:
    """(mean loss, mean metrics, mean gradient w.r.t. `trainable`) over `grad_accum` microbatches."""

    def loss_fn(params: Any, microbatch: Batch) -> tuple[jax.Array, Metrics]:
        model = nnx.merge(graphdef, params, frozen)
        return objective(model, microbatch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(trainable, batch)
        return loss, metrics, grads

    def accumulate(
        carry: tuple[jax.Array, Metrics, Any], microbatch: Batch
    ) -> tuple[tuple[jax.Array, Metrics, Any], None]:
        (loss, metrics), grads = grad_fn(trainable, microbatch)
        total = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return total, None

    shapes = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum)))
    (loss_shape, metrics_shape), grads_shape = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, metrics_shape, grads_shape))
    total, _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, grad_accum))
    loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, total)
    return loss, metrics, grads


def compiler_options(fast_compile: bool) -> dict[str, Any] | None:
    """XLA options of the jitted programs: `fast_compile` skips the backend's expensive
    optimisation passes (CPU compiles ~2.5x faster, runs slower): for tests and debugging."""
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if fast_compile else None


def train_step_fn(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedules: Mapping[str, optax.Schedule],
    *,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
) -> Callable[[Any, Any, Any, Batch, jax.Array], tuple[Any, Any, Metrics]]:
    """The pure (un-jitted) step; `make_train_step` jits it with shardings and donation."""

    def train_step(
        trainable: Any, frozen: Any, opt_state: Any, batch: Batch, rng: jax.Array
    ) -> tuple[Any, Any, Metrics]:
        batch = with_augment_seeds(batch, rng)
        loss, metrics, grads = loss_and_grads(graphdef, objective, trainable, frozen, batch, grad_accum)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_trainable = jax.tree.map(keep, new_trainable, trainable)
            new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        # Every group's adam state counts the same steps; the learning rate used is the one at that count.
        count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        metrics.update({f"lr/{group}": schedule(count) for group, schedule in schedules.items()})
        return new_trainable, new_opt_state, metrics

    return train_step


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedules: Mapping[str, optax.Schedule],
    *,
    trainable_shardings: Any,
    frozen_shardings: Any,
    opt_shardings: Any,
    batch_shardings: Any,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[Any, Any, Any, Batch, jax.Array], tuple[Any, Any, Metrics]]:
    """`train_step` under `jax.jit` with explicit in/out shardings; trainable and opt_state donated."""
    step = train_step_fn(graphdef, objective, tx, schedules, grad_accum=grad_accum, skip_nonfinite=skip_nonfinite)
    mesh = jax.tree.leaves(batch_shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(trainable_shardings, frozen_shardings, opt_shardings, batch_shardings, replicated),
        out_shardings=(trainable_shardings, opt_shardings, replicated),
        donate_argnums=(0, 2),
        compiler_options=compiler_options,
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    *,
    trainable_shardings: Any,
    frozen_shardings: Any,
    batch_shardings: Any,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[Any, Any, Batch], Metrics]:
    """`eval_step(trainable, frozen, batch) -> metrics` (the objective's, plus `loss`), jitted."""

    def eval_step(trainable: Any, frozen: Any, batch: Batch) -> Metrics:
        loss, metrics = objective(nnx.merge(graphdef, trainable, frozen), batch)
        return dict(metrics, loss=loss)

    mesh = jax.tree.leaves(batch_shardings)[0].mesh
    return jax.jit(
        eval_step,
        in_shardings=(trainable_shardings, frozen_shardings, batch_shardings),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
        compiler_options=compiler_options,
    )
