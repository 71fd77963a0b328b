"""The pipeline's per-record step: a record -> an `Example` of one kind, or `Skipped(reason)`.

    records (from `mixture`)
        | random_map(ExampleMaker): decode + resample audio, pick kind, task and prompt,
        |   interleave, tokenize, choose a bucket   -> Example, or Skipped(reason)
        v
    examples, grouped into batches by `batching`

In the data flow (sources -> examples -> buckets -> batches) this is "examples". All the
randomness comes from the per-index generator Grain passes in, so an example depends only
on (seed, index). Bad data never raises out of here: unreadable audio, empty transcripts,
over-long examples and missing teacher targets become `Skipped(reason)`, the reason being
the real cause, which `batching` counts as `skipped/<reason>`:

    missing_file, unreadable, empty_file, undecodable, truncated, empty_audio
                     the audio file (`audio.AUDIO_CAUSES`)
    too_short        a clip too short for one audio token
    too_long         audio longer than `max_audio_seconds` (from the header, before decoding), than
                     the largest bucket, or split into more than max_slots slots
    too_many_tokens  a clip that fits, with more student or teacher tokens than any bucket holds
    empty_text       a transcript of whitespace only
    no_target, no_question, no_word_timings
                     what the drawn kind needs and the record lacks
    template_refused a conversation whose roles the chat template will not render

Conversation records (`conversations`) are their own kind: every assistant turn
supervised, each audio part an audio slot (a long one split when `overlong` says so).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from speechlm_jax.data import interleave
from speechlm_jax.data.audio import (
    AudioError,
    AudioSegment,
    audio_duration,
    decode_audio,
    encoded_duration,
    load_audio,
)
from speechlm_jax.data.config import CONVERSATION_KIND, RUNNING_TEXT_KIND, TEXT_KIND, PipelineConfig
from speechlm_jax.data.conversations import conversation_segments, teacher_responses
from speechlm_jax.data.examples import (
    Audio,
    Example,
    ExampleError,
    Segment,
    Skipped,
    Text,
    build_example,
    chat_segments,
    leading_space,
    prompt_segments,
)
from speechlm_jax.data.sources import Record, TargetTable
from speechlm_jax.data.tasks import TextTask, get_task
from speechlm_jax.data.tokenizer import SpeechTokenizer
from speechlm_jax.models.frontend import HOP_LENGTH, audio_token_count

log = logging.getLogger(__name__)


def record_audio(record: Record, sample_rate: int, *, max_seconds: float | None = None) -> np.ndarray:
    """A speech record's audio, int16 [samples]: its encoded bytes (Hugging Face rows), or its
    file, or the segment of it that the record's `offset` and `duration` name (Lhotse cuts, NeMo
    lines); AudioError when it names none, cannot be read, or is longer than `max_seconds`."""
    if record.get("audio_bytes") is not None:
        source = record.get("audio_source") or str(record.get("id"))
        return decode_audio(record["audio_bytes"], sample_rate=sample_rate, source=source, max_seconds=max_seconds)
    if record.get("audio") is None:
        raise AudioError(record.get("audio_source") or str(record.get("id")), "names no audio", "missing_file")
    segment = None
    if record.get("offset") is not None or record.get("channel") is not None:
        segment = AudioSegment(float(record.get("offset") or 0.0), record.get("duration"), record.get("channel"))
    return load_audio(record["audio"], sample_rate=sample_rate, segment=segment, max_seconds=max_seconds)


def record_seconds(record: Record) -> float:
    """A speech record's audio duration in seconds, without decoding it: its `duration` (the
    segment's, for Lhotse and NeMo; the manifest's), else the header of its bytes or its file."""
    if record.get("duration"):
        return float(record["duration"])
    if record.get("waveform") is not None:
        raise ValueError(f"record {record.get('id')!r} holds a waveform without its duration")
    if record.get("audio_bytes") is not None:
        return encoded_duration(record["audio_bytes"], source=record.get("audio_source") or str(record.get("id")))
    if record.get("audio") is None:
        raise AudioError(record.get("audio_source") or str(record.get("id")), "names no audio", "missing_file")
    return audio_duration(record["audio"])


def _skip_message(record: Record, error: Exception) -> str:
    """`id <id> (<audio file>): <what is wrong>`, naming the record a skip is about."""
    source = record.get("audio") if isinstance(record.get("audio"), str) else None
    text = str(error)
    named = f" ({source})" if source and source not in text else ""
    return f"id {record.get('id', '?')}{named}: {text}"


def _transcript(record: Record) -> str:
    """The record's transcript, whitespace-normalised; ExampleError("empty_text") when it has none."""
    text = " ".join(record.get("text", "").split())
    if not text:
        raise ExampleError("empty_text")
    return text


def _split(segments: list[Segment]) -> bool:
    """Whether two audio slots are adjacent (the pieces of one split clip)."""
    return any(isinstance(a, Audio) and isinstance(b, Audio) for a, b in zip(segments, segments[1:]))


class ExampleMaker:
    """The per-record map: a record and Grain's per-index rng -> `Example` or `Skipped`."""

    def __init__(self, config: PipelineConfig, tokenizer: SpeechTokenizer, targets: TargetTable) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.targets = targets
        self.kinds = tuple(k for k, w in config.kinds.items() if w > 0)
        weights = np.asarray([config.kinds[k] for k in self.kinds], np.float64)
        self.kind_p = weights / weights.sum()
        self.task_ids = {name: i for i, name in enumerate(config.task_names)}
        self.max_samples = config.buckets[-1][0]
        # The shortest clip that gives one audio token: shorter spoken spans stay text.
        self.min_samples = next(
            n for n in range(0, self.max_samples + 1, HOP_LENGTH) if audio_token_count(n, config.downsample) >= 1
        )

    def __call__(self, record: Record, rng: np.random.Generator) -> Example | Skipped:
        try:
            if "messages" in record:
                segments = chat_segments(
                    self.tokenizer, record["messages"], supervise_prompt=self.config.text_loss == "all"
                )
                example = build_example(
                    segments, self.tokenizer, downsample=self.config.downsample, task_id=self.task_ids[TEXT_KIND]
                )
            elif "conversation" in record:
                segments = self._conversation_segments(record, rng)
                example = build_example(
                    segments,
                    self.tokenizer,
                    downsample=self.config.downsample,
                    task_id=self.task_ids[CONVERSATION_KIND],
                )
            else:
                kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
                if kind == RUNNING_TEXT_KIND:
                    segments, task_name = self._running_text_segments(record, rng), kind
                else:
                    segments, task_name = self._speech_segments(kind, record, rng)
                example = build_example(
                    segments, self.tokenizer, downsample=self.config.downsample, task_id=self.task_ids[task_name]
                )
            # Spoken spans are separated by text, so adjacent slots are the pieces of a split clip.
            example.split = _split(segments)
            return self._bucketed(example)
        except ExampleError as e:
            return Skipped(e.reason, _skip_message(record, e))
        except AudioError as e:
            return Skipped(e.cause, _skip_message(record, e))
        except OSError:  # an I/O error while decoding (the opening is `load_audio`'s to report)
            return Skipped("unreadable")

    def _bucketed(self, example: Example) -> Example:
        if len(example.audio) > self.config.max_slots:
            raise ExampleError("too_long", f"{len(example.audio)} audio slots > max_slots {self.config.max_slots}")
        if example.num_teacher_tokens > self.config.teacher_tokens:
            raise ExampleError("too_many_tokens")
        for b, (samples, tokens) in enumerate(self.config.buckets):
            if example.max_audio_samples <= samples and example.num_tokens <= tokens:
                example.bucket = b
                return example
        # Every clip fits the largest bucket (longer ones were dropped or split): the tokens do not.
        raise ExampleError("too_many_tokens")

    def _waveform(self, record: Record) -> np.ndarray:
        limit = self.config.max_audio_seconds or None
        if record.get("waveform") is not None:
            waveform = np.asarray(record["waveform"], np.int16)
            if limit is not None and waveform.size > limit * self.config.sample_rate:
                seconds = waveform.size / self.config.sample_rate
                raise ExampleError("too_long", f"too long: {seconds:.3f}s > max_audio_seconds {limit:g}s")
        else:
            waveform = record_audio(record, self.config.sample_rate, max_seconds=limit)
        if waveform.size == 0:
            raise ExampleError("empty_audio")
        if waveform.size < self.min_samples:
            raise ExampleError("too_short", f"{waveform.size} samples < {self.min_samples}, one audio token")
        return waveform

    def _sample_spans(self, n: int, rng: np.random.Generator, max_audio_spans: int) -> Any:
        """Interleaving spans over `n` timed words (the config's ratio and span lengths)."""
        c = self.config
        return interleave.sample_spans(
            n, rng, ratio=c.interleave_ratio, min_span=c.span_min, max_span=c.span_max, max_audio_spans=max_audio_spans
        )

    def _content_segments(self, waveform: np.ndarray, words: Any, spans: Any, lead_space: bool) -> list[Segment]:
        """An utterance as segments, the words in `spans` spoken and the rest as text."""
        c = self.config
        return interleave.content_segments(
            waveform,
            words,
            spans,
            lead_space=lead_space,
            max_samples=self.max_samples,
            split_long=c.overlong == "split",
            sample_rate=c.sample_rate,
            margin_s=c.margin_s,
            min_samples=self.min_samples,
        )

    def _conversation_segments(self, record: Record, rng: np.random.Generator) -> list[Segment]:
        """A conversation's segments: audio parts as slots (interleaved when timed and drawn so),
        the record's or the teacher's answers."""
        config = self.config
        responses = None
        if config.conversation_responses == "teacher":
            responses = teacher_responses(record, self.targets)
        parts = sum(p["type"] == "audio" for m in record["conversation"] for p in m["content"])

        def spoken(part: dict[str, Any], lead_space: bool) -> list[Segment]:
            waveform = self._waveform({"audio": part["audio"]})
            words = interleave.record_words({"words": part.get("words"), "text": part["transcript"]})
            if words is not None and rng.random() < config.interleave_prob:
                spans = self._sample_spans(len(words), rng, max(1, config.max_slots // parts))
                return self._content_segments(waveform, words, spans, lead_space)
            return interleave.whole_utterance(
                waveform,
                part["transcript"],
                None,
                lead_space=lead_space,
                max_samples=self.max_samples,
                split_long=config.overlong == "split",
                sample_rate=config.sample_rate,
            )

        return conversation_segments(self.tokenizer, record["conversation"], spoken=spoken, responses=responses)

    def _running_text_segments(self, record: Record, rng: np.random.Generator) -> list[Segment]:
        """`<bos>` and the transcript with random spans spoken, its written words supervised."""
        _transcript(record)  # raises empty_text: its words come from the timings below
        words = interleave.record_words(record)
        if words is None:
            raise ExampleError("no_word_timings")
        spans = self._sample_spans(len(words), rng, self.config.max_slots)
        if all(span.audio for span in spans):  # nothing written, nothing to distil: speak a prefix only
            if len(words) < 2:
                raise ExampleError("too_short", "a one-word transcript has no written word after its speech")
            cut = int(rng.integers(1, len(words)))
            spans = [interleave.Span(0, cut, True), interleave.Span(cut, len(words), False)]
        content = self._content_segments(self._waveform(record), words, spans, False)
        written = [Text(s.text, supervised=True) if isinstance(s, Text) else s for s in content]
        return [Text(self.tokenizer.hf.bos_token or ""), *written]

    def _prompt_and_response(
        self, task: TextTask, record: Record, text: str, rng: np.random.Generator
    ) -> tuple[str, str]:
        pool = task.prompts(self.config.prompt_split)
        question = record.get("question")
        if task.name == "spoken_qa":
            if question is None:
                raise ExampleError("no_question")
            pool = tuple(p.replace("{question}", question) for p in pool)
        answer = record.get("answer") if task.name == "spoken_qa" else None
        # ASR's response is the transcript itself, never a teacher generation.
        if answer is None and task.answer is not None and (self.config.use_task_answer or task.name == "asr"):
            answer = task.answer(text)
        if answer is not None:
            return pool[int(rng.integers(len(pool)))], answer
        # The teacher's own responses exist for some prompts only: draw among those.
        responses = self.targets.lookup(record["id"], task.name)
        usable = [p for p in pool if p in responses]
        if not usable:
            raise ExampleError("no_target")
        prompt = usable[int(rng.integers(len(usable)))]
        return prompt, responses[prompt]

    def _speech_segments(self, kind: str, record: Record, rng: np.random.Generator) -> tuple[list[Segment], str]:
        config = self.config
        text = _transcript(record)
        if kind in ("imitation", "mixed_modal"):
            task = get_task(config.tasks[int(rng.integers(len(config.tasks)))])
        else:
            task = get_task(kind)
        prompt, response = self._prompt_and_response(task, record, text, rng)
        words = interleave.record_words(record)
        waveform = self._waveform(record)
        space = leading_space(prompt)
        split_long = config.overlong == "split"
        if kind == "mixed_modal" or (words is not None and rng.random() < config.interleave_prob):
            if words is None:
                raise ExampleError("no_word_timings")
            if kind == "mixed_modal":
                spans = interleave.single_audio_span(
                    len(words), rng, min_span=config.span_min, max_span=config.span_max
                )
            else:
                spans = self._sample_spans(len(words), rng, config.max_slots)
            content = self._content_segments(waveform, words, spans, space)

        else:
            content = interleave.whole_utterance(
                waveform,
                text,
                words,
                lead_space=space,
                max_samples=self.max_samples,
                split_long=split_long,
                sample_rate=config.sample_rate,
            )
        return prompt_segments(self.tokenizer, prompt, content, response), task.name
