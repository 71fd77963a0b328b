"""Step 5 of active selection: continue a stage-1 SALAD run on its mixture plus the selected speech.

The paper resumes stage 1 before its learning-rate decay and decays linearly to 0 over
the stage-2 steps. A stage-1 run on the `warmup_stable_decay` schedule keeps the checkpoint
of its last step before the decay, and stage 2 starts there by default.

This is done with the real trainer (`train.trainer.train`) and the stage-1 run's own resolved
config (`configs/salad.py` as it ran), changed in these keys:

    data.speech_sources   the stage-1 sources + the synthesised manifest (`repeat` times:
                          a ConcatSource samples sources by size, so repeating upweights it)
    data.targets          + the teacher's targets for the new utterances, when the stage-1
                          mixture reads targets (`target_tasks`; `speechlm-generate` writes them)
    train.steps           start_step + steps
    optimizer             warmup_stable_decay with decay_fraction = steps / (start_step + steps)
                          and min_lr_ratio 0: the learning rate is at its peak at start_step
                          and falls linearly to 0 at the last step (the optimiser's step
                          count continues from the stage-1 checkpoint)

The trainer resumes only from its own workdir, so the stage-2 workdir is seeded with a copy
of the stage-1 checkpoint at `start_step` (parameters, optimiser state, rng, base hash),
whose data-iterator state is replaced by a fresh iterator of the new mixture. The trainer
then checks the frozen base against the stage-1 hash and continues; a rerun of stage 2
resumes from its own latest checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import ml_collections

from speechlm_jax import storage
from speechlm_jax.data.pipeline import save_iterator
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import optimizer, trainer
from speechlm_jax.train.data import Data
from speechlm_jax.train.restore import read_config as load_run_config


def stage1_steps(workdir: str | Path) -> list[int]:
    """The checkpointed steps of a run, ascending."""
    root = storage.path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def default_start_step(workdir: str | Path, config: ml_collections.ConfigDict) -> int:
    """Where stage 2 starts by default: the stage-1 run's last step before its decay, as the paper does.

    A warmup-stable-decay run keeps that checkpoint (`train.trainer`); a run with another
    schedule (or one cut short of its decay) has none, and stage 2 starts from its latest
    checkpoint: past the decay, at a learning rate that jumps back to the peak.
    """
    available = stage1_steps(workdir)
    if not available:
        raise FileNotFoundError(f"stage-1 run {workdir} has no checkpoint")
    pre_decay = optimizer.decay_start(config.optimizer, config.train.steps)
    if pre_decay is not None and pre_decay in available:
        return pre_decay
    logging.warning(
        "stage-1 run %s has no checkpoint before a learning-rate decay (schedule %s); stage 2 starts from "
        "its latest, step %d",
        workdir,
        config.optimizer.schedule,
        available[-1],
    )
    return available[-1]


def target_tasks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The tasks whose responses the run's mixture reads from teacher-target files (none: no targets needed).

    `imitation` and `mixed_modal` examples ask `data.tasks`, `continuation` its own task; with
    `data.use_task_answer` the computable answers replace the targets, and a run without
    `data.targets` never read any.
    """
    if not config.data.targets or config.data.use_task_answer:
        return ()
    kinds = {k: float(v) for k, v in config.data.kinds.items() if float(v) > 0}
    tasks = list(config.data.tasks) if {"imitation", "mixed_modal"} & set(kinds) else []
    return tuple(dict.fromkeys(tasks + (["continuation"] if "continuation" in kinds else [])))


def stage2_config(
    stage1: ml_collections.ConfigDict,
    manifest: str | Path,
    *,
    start_step: int,
    steps: int,
    repeat: int = 1,
    targets: tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """The stage-2 config (see the module docstring) from the stage-1 run's resolved config.

    `targets`: teacher-target files of the new utterances, added to `data.targets`.
    """
    if steps < 1 or start_step < 0 or repeat < 1:
        raise ValueError(f"need steps >= 1, start_step >= 0, repeat >= 1; got {steps}, {start_step}, {repeat}")
    c = ml_collections.ConfigDict(stage1.to_dict())
    new = {"type": "manifest", "path": storage.absolute(manifest)}
    c.data.speech_sources = tuple(list(stage1.data.speech_sources) + [new] * repeat)
    c.data.targets = tuple(list(stage1.data.targets) + [storage.absolute(t) for t in targets])
    c.train.steps = start_step + steps
    c.optimizer.schedule = "warmup_stable_decay"
    c.optimizer.decay_fraction = steps / (start_step + steps)
    c.optimizer.min_lr_ratio = 0.0
    return c


def seed_from_stage1(
    stage1_workdir: str | Path, start_step: int, workdir: str | Path, config: ml_collections.ConfigDict
) -> bool:
    """Copies the stage-1 checkpoint at `start_step` into `workdir` with a fresh data position.

    Does nothing (returns False) when `workdir` already has a checkpoint: stage 2 then resumes
    its own.
    """
    workdir = Path(workdir)
    if stage1_steps(workdir):
        return False
    source = Path(stage1_workdir) / "checkpoints" / str(start_step)
    if not source.is_dir():
        raise FileNotFoundError(
            f"stage-1 run {stage1_workdir} has no checkpoint at step {start_step} (has {stage1_steps(stage1_workdir)})"
        )
    target = workdir / "checkpoints" / str(start_step)
    partial = target.with_name(f".{start_step}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    # The stage-1 data position indexes the stage-1 mixture; stage 2 reads a new one from its start.
    shutil.rmtree(partial / "data")
    iterator, _ = Data(config).train_iterator()
    save_iterator(iterator, partial / "data")
    partial.rename(target)
    return True


def continue_training(
    stage1_workdir: str | Path,
    manifest: str | Path,
    workdir: str | Path,
    *,
    steps: int,
    start_step: int | None = None,
    repeat: int = 1,
    targets: tuple[str, ...] = (),
    overrides: dict[str, object] | None = None,
) -> trainer.TrainResult:
    """Stage 2 through the real trainer: from the stage-1 checkpoint `start_step` (default: `default_start_step`).

    `targets` are the new utterances' teacher-target files (when the mixture reads targets);
    `overrides` sets dotted config keys (e.g. {"train.progress_bar": False}).
    """
    stage1 = load_run_config(stage1_workdir)
    start = default_start_step(stage1_workdir, stage1) if start_step is None else start_step
    config = stage2_config(stage1, manifest, start_step=start, steps=steps, repeat=repeat, targets=targets)
    config_lib.check_overrides(config, list(overrides or {}))
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    seed_from_stage1(stage1_workdir, start, workdir, config)
    return trainer.train(config, workdir)
