"""The training loop, top to bottom: config, data, mesh, model, state, resume, steps, loop.

Everything a run does is in `train` in reading order; the pieces it calls each have one
job (`state`: the model split into what trains and the frozen base, the optimiser and their
shardings; `step`: the jitted pure step; `checkpoint`: orbax; `metrics`: TensorBoard, the
progress bar, MFU).

Resume order (as big_vision): 1. this workdir's own latest checkpoint (a restart after
preemption or a crash continues exactly: parameters, optimiser, rng, data position),
2. otherwise a fresh start from the pretrained base (or random init for tiny configs).
The frozen base is rebuilt from its source on every start and its content hash must match
the one the checkpoint recorded.

Failure handling: SIGTERM (preemption) finishes the current step, saves a checkpoint and
returns; a non-finite loss stops the run naming the step range in which it appeared
(metrics are fetched from the device every `log_every` steps, and always before a
checkpoint is written, so a non-finite state is never saved), or, with
`train.nonfinite="skip"`, the step discards its update and the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from speechlm_jax import distributed, storage
from speechlm_jax.data import preflight
from speechlm_jax.sharding import batch_sharding, make_mesh
from speechlm_jax.train import (
    build,
    checkpoint,
    data,
    metrics,
    objectives,
    optimizer,
    partitions,
    restore,
    step,
    wandb_run,
)
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import state as state_lib


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step range."""


@dataclasses.dataclass
class TrainResult:
    """How a run ended: the last completed step, why, the last logged metrics, and the final state."""

    step: int
    reason: str  # "done" | "preempted"
    metrics: dict[str, float]
    mesh: Mesh
    trainable: Any
    frozen: Any


class _Preemption:
    """Turns SIGTERM into a stop the loop checks after each step.

    One process: a flag set by the signal handler. Several processes: the checkpoint is a
    collective, so every host must stop at the same step; JAX's preemption service (started
    by `jax.distributed.initialize`) agrees on that step (`reached_preemption_sync_point`).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle) if jax.process_count() == 1 else None

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM: saving a checkpoint after this step and stopping")
        self.requested = True

    def reached(self, step_index: int) -> bool:
        if jax.process_count() > 1:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step_index)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _global_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over the batch axes (works multi-host)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def _mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    fetched = jax.device_get(records)
    return {k: float(np.mean([r[k] for r in fetched])) for k in fetched[0]}


def evaluate(
    eval_step: Any, trainable: Any, frozen: Any, batches: Iterator[Mapping[str, np.ndarray]], shardings: Any, limit: int
) -> dict[str, float]:
    """Mean of the objective's metrics over up to `limit` held-out batches."""
    records = []
    for i, batch in enumerate(batches):
        if i >= limit:
            break
        records.append(eval_step(trainable, frozen, _global_batch(batch, shardings)))
    return _mean_metrics(records) if records else {}


def train(
    config: ml_collections.ConfigDict, workdir: storage.PathLike, *, devices: Sequence[jax.Device] | None = None
) -> TrainResult:
    """Trains `config` in `workdir` (resuming from its latest checkpoint if there is one).

    `devices` (default: all) are the devices the mesh spreads over.
    """
    # --- Config: every value checked before anything is built. Nothing in the workdir is written
    # until the run is known to start (state built, checkpoint fits and restored), so a failed
    # start leaves it exactly as it was.
    config_lib.validate(config)
    preflight.check_sources(config)
    if problem := storage.path_problem(workdir):
        raise storage.UnsupportedPath(f"workdir {problem}")
    workdir = storage.path(workdir)  # local, or in an object store (gs://, s3://)
    groups = config_lib.trainable_groups(config)
    if config.train.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    # --- Mesh and shardings: logical axes -> mesh axes from the config's rules table.
    mesh = make_mesh(dict(config.mesh), devices)
    rules = config_lib.sharding_rules(config)
    logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)
    distributed.log_topology(mesh)

    # --- Data: the Grain iterator (checkpointed with the state) and the held-out batches.
    pipeline = data.Data(config)
    train_iter, data_stats = pipeline.train_iterator()
    batch_shardings = {name: batch_sharding(mesh, ndim, rules) for name, ndim in pipeline.batch_ndims().items()}
    vocab = build.llm_config(config).vocab_size
    if len(pipeline.tokenizer) > vocab:
        raise config_lib.ConfigError(
            f"tokenizer {config.data.tokenizer!r} has {len(pipeline.tokenizer)} tokens, the LLM's vocabulary "
            f"only {vocab}"
        )

    # --- State: the batch checked against the mesh; the model in its shardings, split into what
    # trains and the frozen base; the optimiser state of the trainable groups only, sharded like them.
    state = state_lib.build_state(config, mesh, for_training=True)
    graphdef, trainable, frozen, opt_state = state.graphdef, state.trainable, state.frozen, state.opt_state
    trainable_sh, frozen_sh = state.trainable_shardings, state.frozen_shardings
    # Jitted with explicit shardings; trainable and opt_state are donated.
    train_step = state_lib.make_train_step(
        state, config, batch_shardings, compiler_options=step.compiler_options(config.train.fast_compile)
    )
    del state  # the loop rebinds trainable and opt_state; `state` would pin the first ones
    logging.info("trainable %s; frozen %s", partitions.count_params(trainable), partitions.count_params(frozen))
    base = {"base_hash": checkpoint.base_hash(frozen), "base_path": restore.base_path(config)}
    rng = jax.random.key(config.seed)

    with contextlib.ExitStack() as cleanup:
        # --- Resume: this workdir's latest checkpoint, else the fresh state above. Its tensors are
        # checked against the config first, naming the first one of another shape.
        # A warmup-stable-decay run also keeps its last step before the decay (SALAD's stage 2 starts there).
        pre_decay = optimizer.decay_start(config.optimizer, config.train.steps)
        ckpt = checkpoint.Checkpointer(
            workdir,
            every=config.checkpoint.every,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
            keep_steps=() if pre_decay is None else (pre_decay,),
        )
        cleanup.callback(ckpt.close)
        latest = ckpt.latest_step()
        start = latest or 0
        # Step 0 exists when the workdir was made by `speechlm-convert import`: resume it too.
        if latest is not None:
            ckpt.check_fits(
                start,
                trainable,
                opt_state,
                context=f"this run's config (the workdir was trained with another model or optimiser; its own "
                f"config is {workdir / 'config.json'}): restart with that config or use a fresh --workdir",
            )
            trainable, opt_state, meta = ckpt.restore(start, trainable, opt_state, train_iter)
            checkpoint.check_base(meta, base["base_hash"], base["base_path"])
            rng = checkpoint.rng_from_meta(meta["rng"], rng)
            logging.info("resumed from step %d", start)

        # --- The first batch before anything is written: data that makes no example (every audio
        # path wrong, say) fails here, and leaves the workdir as it was.
        first_batch = next(train_iter) if start < config.train.steps else None

        # --- The run starts: record exactly what runs.
        if jax.process_index() == 0:
            config_lib.write_resolved(config, workdir)

        # --- The held-out step (the train step was made with the state above).
        xla_options = step.compiler_options(config.train.fast_compile)
        eval_step = step.make_eval_step(
            graphdef,
            objectives.make_objective(config.loss),
            trainable_shardings=trainable_sh,
            frozen_shardings=frozen_sh,
            batch_shardings=batch_shardings,
            compiler_options=xla_options,
        )

        # --- Reporting: TensorBoard, metrics.jsonl, progress bar, MFU from the analytic FLOP count.
        writer = metrics.MetricWriter(workdir, wandb=wandb_run.WandbRun.open(config, workdir))
        cleanup.callback(writer.close)
        bar = metrics.ProgressBar(config.train.steps, start, enabled=config.train.progress_bar)
        cleanup.callback(bar.close)
        flops = metrics.ModelFlops(
            build.abstract_model(config),
            groups,
            uses_teacher=config.loss.name in objectives.USES_TEACHER,
            downsample=config.model.projector.downsample,
        )
        throughput = metrics.Throughput(list(mesh.devices.flat))
        throughput.reset(start)
        preemption = _Preemption()
        cleanup.callback(preemption.restore)

        # --- The loop. `step_index` counts completed optimiser steps.
        pending: list[tuple[int, dict[str, Any]]] = []
        last: dict[str, float] = {}

        def log() -> None:
            """Fetches the pending step metrics, stops (or counts skips) on non-finite values, writes them."""
            nonlocal last
            if not pending:
                return
            first, latest = pending[0][0], pending[-1][0]
            record = _mean_metrics([m for _, m in pending])
            pending.clear()
            if record["finite"] < 1.0 and config.train.nonfinite == "stop":
                raise NonFiniteLossError(
                    f"loss or gradient became non-finite between steps {first} and {latest} (loss={record['loss']})"
                )
            record["skipped_steps"] = (1.0 - record.pop("finite")) * (latest - first + 1)
            record.update(throughput.rates(latest))
            record.update({f"data/{k}": float(v) for k, v in data_stats.as_dict().items()})
            throughput.reset(latest)
            writer.write(latest, record)
            bar.update(latest - bar.bar.n, record)
            last = record

        step_index, reason = start, "done"
        while step_index < config.train.steps:
            batch = next(train_iter) if first_batch is None else first_batch
            first_batch = None
            throughput.add(*metrics.batch_counts(batch), flops.of_batch(batch))
            trainable, opt_state, step_metrics = train_step(
                trainable, frozen, opt_state, _global_batch(batch, batch_shardings), jax.random.fold_in(rng, step_index)
            )
            step_index += 1
            pending.append((step_index, step_metrics))

            if step_index % config.train.log_every == 0 or step_index == config.train.steps:
                log()
            if config.train.eval_every and step_index % config.train.eval_every == 0:
                scores = evaluate(
                    eval_step, trainable, frozen, pipeline.eval_batches(), batch_shardings, config.train.eval_batches
                )
                writer.write(step_index, scores, split="eval")
            if preemption.reached(step_index) or ckpt.should_save(step_index) or step_index == config.train.steps:
                log()  # a non-finite state must never be saved
                meta = dict(base, rng=checkpoint.rng_to_meta(rng))
                ckpt.save(step_index, trainable, opt_state, meta, train_iter)
            if preemption.requested:
                reason = "preempted"
                break
    return TrainResult(step=step_index, reason=reason, metrics=last, mesh=mesh, trainable=trainable, frozen=frozen)
