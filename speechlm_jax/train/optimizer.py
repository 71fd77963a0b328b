"""The optimiser: global-norm clipping, then AdamW per parameter group with its own schedule.

Only the trainable state is given to `optax`, so frozen weights have no optimiser state at
all (the MaxText approach of `set_to_zero` on a full tree would still allocate its labels
and walk the frozen tree every step). Groups (`partitions.GROUPS`) get separate schedules
of the same shape scaled to their peak learning rate: SALAD trains the projector at 1e-3
and the LLM at 5e-5 in one run. Weight decay skips norms and biases (`partitions.decays`).

Schedules:
    warmup_cosine         linear warmup to the peak, cosine to peak * min_lr_ratio at the last step
    warmup_stable_decay   linear warmup, constant, then linear decay over the last
                          `decay_fraction` of the steps (WSD, as in MiniCPM)
    constant              linear warmup, then constant
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from speechlm_jax.train import partitions
from speechlm_jax.train.config import trainable_groups


def _warmup(opt: ml_collections.ConfigDict, total_steps: int) -> int:
    return min(opt.warmup_steps, max(total_steps - 1, 0))


def decay_start(opt: ml_collections.ConfigDict, total_steps: int) -> int | None:
    """The step at which a `warmup_stable_decay` schedule starts to decay (None for other schedules).

    The trainer keeps the checkpoint of this step whatever `checkpoint.keep` says: SALAD's
    stage 2 continues from it, at the peak learning rate, on a new mixture (`selection.stage2`).
    """
    if opt.schedule != "warmup_stable_decay":
        return None
    decay_steps = max(int(round(total_steps * opt.decay_fraction)), 1)
    return max(total_steps - decay_steps, _warmup(opt, total_steps))


def make_schedule(opt: ml_collections.ConfigDict, peak_lr: float, total_steps: int) -> optax.Schedule:
    """The learning rate at each optimiser step for a group whose peak is `peak_lr`."""
    warmup = _warmup(opt, total_steps)
    floor = peak_lr * opt.min_lr_ratio
    if opt.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1), end_value=floor)
    warm = optax.linear_schedule(0.0, peak_lr, warmup) if warmup else optax.constant_schedule(peak_lr)
    if opt.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak_lr)], [warmup])
    if opt.schedule == "warmup_stable_decay":
        decay_steps = max(int(round(total_steps * opt.decay_fraction)), 1)
        return optax.join_schedules(
            [warm, optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, floor, decay_steps)],
            [warmup, decay_start(opt, total_steps)],
        )
    raise ValueError(f"unknown schedule {opt.schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(clip + per-group AdamW, {group: schedule}) for the groups `config.train.trainable` names."""
    opt = config.optimizer
    schedules = {g: make_schedule(opt, opt.lr[g], config.train.steps) for g in trainable_groups(config)}
    per_group = {
        group: optax.adamw(
            schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=partitions.decay_mask
        )
        for group, schedule in schedules.items()
    }
    chain = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    chain.append(optax.multi_transform(per_group, partitions.group_labels))
    return optax.chain(*chain), schedules


def learning_rates(schedules: dict[str, optax.Schedule], step: Any) -> dict[str, Any]:
    """{"lr/<group>": value} at optimiser step `step` (for logging)."""
    return {f"lr/{group}": schedule(step) for group, schedule in schedules.items()}
