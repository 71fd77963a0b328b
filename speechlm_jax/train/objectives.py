"""The model-aware glue between a SpeechLM, a batch and the pure losses of `speechlm_jax.losses`.

Each recipe's objective is `objective(model, batch) -> (loss, metrics)`: it runs the
parts of the model the recipe needs and hands hidden states and the unembedding to a
fused loss (`losses.fused`: chunked, with the gradients made in the forward pass), so the
`[batch, seq, vocab]` logits never exist and no chunk's logits are computed twice. Which
objective runs is data (`config.loss.name`), not a code path per recipe:

    cross_entropy       asr, vtb: CE on `targets` where `loss_mask` is 1
    behavior_imitation  mtbi: CE on the teacher's own response, which the data pipeline
                        has already placed as `targets` / `loss_mask` (read from the
                        targets JSONL written by the teacher's generation)
    ctc                 encoder pretraining or connector alignment: CTC of each audio slot's
                        projector frames against its transcript (`audio_labels`) through the
                        LLM's head, chunked over the frames
    salad               alpha * KL(teacher || student) on `kl_mask` + (1 - alpha) * NLL on
                        `loss_mask`; the teacher is the same LLM with LoRA off on the
                        text twin, in the same step, under `stop_gradient`

Metrics are the loss's own (per-part losses, token counts) under the objective's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from speechlm_jax.losses.common import gather_teacher
from speechlm_jax.losses.ctc import chunked_ctc_loss
from speechlm_jax.losses.fused import fused_cross_entropy, fused_salad_objective

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Objective = Callable[[Any, Batch], tuple[jax.Array, Metrics]]


def cross_entropy(model: Any, batch: Batch, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """Masked CE of the student (speech input, LoRA on) on `targets` / `loss_mask`.

    `cfg.label_smoothing` and `cfg.z_loss` add uniform label smoothing and PaLM's z-loss.
    """
    hidden = model.student_hidden(batch)
    return fused_cross_entropy(
        hidden,
        model.llm.unembedding(),
        batch["targets"],
        batch["loss_mask"],
        chunk_size=cfg.chunk_size,
        softcap=model.llm.config.final_logit_softcapping,
        weights=batch["weight"],
        z_loss=cfg.z_loss,
        label_smoothing=cfg.label_smoothing,
    )


def behavior_imitation(model: Any, batch: Batch, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """CE of the student on the teacher's own response (the pipeline puts it in `targets`).

    Options as `cross_entropy`; the z-loss metric is reported only while that term is on.
    """
    loss, metrics = cross_entropy(model, batch, cfg)
    if not cfg.z_loss:
        metrics.pop("z_loss")
    return loss, metrics


def salad(model: Any, batch: Batch, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """alpha * KL(teacher(text twin, LoRA off) || student(speech)) + (1 - alpha) * NLL."""
    student = model.student_hidden(batch)
    # The teacher is the frozen base on text: no gradient may reach it, whatever trains.
    teacher = jax.lax.stop_gradient(model.teacher_hidden(batch))
    teacher_at_student = gather_teacher(teacher, batch["teacher_index"])
    return fused_salad_objective(
        student,
        teacher_at_student,
        model.llm.unembedding(),
        batch["targets"],
        batch["kl_mask"],
        batch["loss_mask"],
        alpha=cfg.alpha,
        chunk_size=cfg.chunk_size,
        temperature=cfg.temperature,
        direction=cfg.direction,
        jsd_beta=cfg.jsd_beta,
        softcap=model.llm.config.final_logit_softcapping,
        weights=batch["weight"],
    )


def ctc(model: Any, batch: Batch, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """CTC of every audio slot's projector frames against its transcript, read out by the LLM's head.

    The projector's frames go through the LLM's final norm and unembedding (no decoder
    layer), so the loss asks each frame to look like the embedding of the word it carries,
    or like `blank_id` between words (the connector's own learned blank with
    `model.projector.ctc_blank`, which a frozen LLM needs: its row for the token is
    untrained). With the encoder (and projector) trainable and a small LLM it pretrains an
    encoder; with the recipe's frozen LLM it aligns the connector to that LLM's own
    embedding space before any instruction data. Slots without a transcript
    (padding) do not count. Chunked over the frames (`cfg.chunk_size`), so the
    `[slots, frames, vocab]` logits never exist whole.
    """
    embeds, mask = model.encode_slots(batch)
    b, s = batch["audio"].shape[:2]
    return chunked_ctc_loss(
        model.llm.norm(embeds),
        model.llm.unembedding(),
        mask,
        batch["audio_labels"].reshape(b * s, -1),
        blank_id=cfg.blank_id,
        chunk_size=cfg.chunk_size,
        weights=jnp.repeat(batch["weight"], s),
        softcap=model.llm.config.final_logit_softcapping,
        blank=model.ctc_blank(),
    )


OBJECTIVES: dict[str, Callable[[Any, Batch, ml_collections.ConfigDict], tuple[jax.Array, Metrics]]] = {
    "cross_entropy": cross_entropy,
    "behavior_imitation": behavior_imitation,
    "salad": salad,
    "ctc": ctc,
}

# The recipes whose objective runs the teacher forward (counted in the FLOPs).
USES_TEACHER = ("salad",)


def make_objective(loss_config: ml_collections.ConfigDict) -> Objective:
    """`objective(model, batch) -> (loss, metrics)` for `config.loss` (name + its options)."""
    fn = OBJECTIVES[loss_config.name]
    cfg = ml_collections.ConfigDict(loss_config.to_dict())

    def objective(model: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        loss, metrics = fn(model, batch, cfg)
        return loss, {f"{loss_config.name}/{k}": v for k, v in metrics.items()}

    return objective
