"""What the data pipeline reads and how it shapes it: `PipelineConfig`.

The first stop of the data flow (sources -> examples -> buckets -> batches): every other
pipeline module (`mixture`, `maker`, `batching`, `pipeline`) takes its settings from one
`PipelineConfig`, built from a recipe's ConfigDict with `from_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from speechlm_jax import cli

SPEECH_SOURCE_TYPES = cli.SOURCE_TYPES
SPEECH_KINDS = ("asr", "continuation", "imitation", "spoken_qa", "mixed_modal", "running_text")
TEXT_KIND = "text_sft"
# The transcript as plain running text with random spans spoken: no prompt, no chat frame, KL on
# the written tokens (SALAD's stage 1, and the form its diagnostics measure M in).
RUNNING_TEXT_KIND = "running_text"
CONVERSATION_KIND = "conversation"  # multi-turn records (`conversations`), their task_id name


def audio_limit_problem(
    max_audio_seconds: float, buckets: tuple[tuple[int, int], ...], overlong: str, sample_rate: int
) -> str:
    """Why `max_audio_seconds` cannot work with these buckets ("" when it can).

    With overlong "drop" an utterance is one slot, so every length up to the maximum must fit
    the largest bucket; otherwise those between the bucket and the maximum would all be skipped.
    """
    if max_audio_seconds < 0:
        return f"max_audio_seconds must be >= 0 (0: the largest bucket), got {max_audio_seconds}"
    largest = max(a for a, _ in buckets)
    if overlong == "drop" and max_audio_seconds * sample_rate > largest:
        needed = math.ceil(max_audio_seconds * sample_rate)
        return (
            f"max_audio_seconds={max_audio_seconds:g} is longer than the largest bucket "
            f"({largest} samples = {largest / sample_rate:g} s), so utterances between the two would all be "
            f"skipped: add a bucket of at least {needed} samples (a multiple of the encoder's window wastes "
            "no encoder work), or set overlong='split'"
        )
    return ""


@dataclasses.dataclass
class PipelineConfig:
    """What to read and how to shape it. Also accepts an ml_collections ConfigDict (`from_config`).

    speech_sources: dicts `{"type": one of SPEECH_SOURCE_TYPES, "path": ..., "split": "train"}`
      (split only for tfds and hf; defaults to the pipeline's split). An `hf` source also takes
      "audio_column" and "text_column" (default "audio", "text"); see `hf_source`, and
      `corpus_manifests` for the `lhotse` and `nemo` manifests.
    text_sources / targets: JSONL paths (text-only SFT data; teacher responses).
    text_weight: fraction of text-only examples in the mixture (VoiceTextBlender: 0.15).
    text_loss: "response" (the assistant turn only, SFT) or "all" (every token of a
      text-only example: language modelling, for an LLM trained from scratch).
    conversation_sources / conversation_weight: multi-turn conversation JSONL paths
      (`conversations`) and their fraction of the mixture (the speech sources get
      `1 - text_weight - conversation_weight`).
    conversation_responses: "record" (train on the record's assistant turns) or "teacher"
      (the teacher's own answers from `targets`: MTBI, SALAD).
    kinds: weights of the speech example kinds (`SPEECH_KINDS`); `running_text` is the
      transcript after the tokenizer's BOS, interleaved (spans as `interleave`), its written
      words supervised, no prompt (cross-modal distillation on running text, as SALAD's stage 1).
    tasks: text tasks for `imitation` and `mixed_modal` (registered names).
    use_task_answer: take those responses from `TextTask.answer` instead of the targets.
    prompt_split: "train" or "heldout" prompt phrasings.
    interleave_prob: probability that a speech example's content is interleaved
      (MTBI / SALAD) rather than fully spoken; ratio and span lengths as in `interleave`.
    buckets: static shapes `(audio_samples per slot, student tokens)`; max_slots slots per
      example; teacher_tokens the teacher twin's length.
    overlong: "drop" or "split" (a too-long clip becomes several consecutive slots).
    max_audio_seconds: the longest utterance read (0: as long as the largest bucket); a longer
      one is skipped as `too_long` before it is decoded. A slot may be longer than the
      encoder's window (the model encodes it window by window), so with "drop" the largest
      bucket must hold it.
    """

    speech_sources: tuple[Mapping[str, Any], ...] = ()
    text_sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    text_weight: float = 0.0
    text_loss: str = "response"
    conversation_sources: tuple[str, ...] = ()
    conversation_weight: float = 0.0
    conversation_responses: str = "record"
    kinds: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"asr": 1.0})
    tasks: tuple[str, ...] = ()
    use_task_answer: bool = False
    prompt_split: str = "train"
    interleave_prob: float = 0.0
    interleave_ratio: float = 0.5
    span_min: int = 1
    span_max: int = 5
    margin_s: float = 0.02
    buckets: tuple[tuple[int, int], ...] = ((16000 * 8, 256),)
    max_slots: int = 4
    teacher_tokens: int = 256
    batch_size: int = 8
    downsample: int = 4
    sample_rate: int = 16000
    overlong: str = "drop"
    max_audio_seconds: float = 0.0
    num_epochs: int | None = None
    num_threads: int = 2
    prefetch_buffer_size: int = 16
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted((int(a), int(t)) for a, t in self.buckets))
        unknown = set(self.kinds) - set(SPEECH_KINDS)
        if unknown:
            raise ValueError(f"unknown example kinds {sorted(unknown)}; known: {SPEECH_KINDS}")
        if self.overlong not in ("drop", "split"):
            raise ValueError(f"overlong must be 'drop' or 'split', got {self.overlong!r}")
        if not self.tasks and any(self.kinds.get(k, 0) > 0 for k in ("imitation", "mixed_modal")):
            raise ValueError("the imitation and mixed_modal kinds draw from config.tasks, which is empty")
        if self.text_loss not in ("response", "all"):
            raise ValueError(f"text_loss must be 'response' or 'all', got {self.text_loss!r}")
        if not 0.0 <= self.text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {self.text_weight}")
        if not 0.0 <= self.conversation_weight <= 1.0 - self.text_weight:
            raise ValueError(
                f"conversation_weight must be in [0, 1 - text_weight], got {self.conversation_weight}"
                f" with text_weight {self.text_weight}"
            )
        if self.conversation_responses not in ("record", "teacher"):
            raise ValueError(
                f"conversation_responses must be 'record' or 'teacher', got {self.conversation_responses!r}"
            )
        # Sizes the batcher loops over: 0 would wait forever for a batch that never fills.
        for name in ("batch_size", "max_slots", "teacher_tokens", "downsample", "sample_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.buckets or any(a < 1 or t < 1 for a, t in self.buckets):
            raise ValueError(f"buckets must be (audio samples, tokens) pairs of positive sizes, got {self.buckets}")
        problem = audio_limit_problem(self.max_audio_seconds, self.buckets, self.overlong, self.sample_rate)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_config(cls, config: Any) -> PipelineConfig:
        """From a PipelineConfig, a mapping or an ml_collections ConfigDict (missing fields default)."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown pipeline config fields {sorted(unknown)}")
        return cls(**values)

    @property
    def task_names(self) -> tuple[str, ...]:
        """Names that `task_id` indexes: the built-in speech tasks, the config's tasks, text_sft."""
        names = ("asr", "continuation", "spoken_qa", *self.tasks, TEXT_KIND)
        # Only runs that read conversations or running text count them, so other runs' metrics keep their names.
        if self.conversation_sources:
            names += (CONVERSATION_KIND,)
        if self.kinds.get(RUNNING_TEXT_KIND, 0) > 0:
            names += (RUNNING_TEXT_KIND,)
        return tuple(dict.fromkeys(names))
