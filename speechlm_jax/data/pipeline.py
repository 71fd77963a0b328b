"""The Grain pipeline: records -> examples -> static-shape batches, per host, resumable.

    speech sources (manifest / LibriSpeech dir / TFDS)     text-only JSONL
        | host shard [process_index::process_count]            | host shard
        | shuffle(seed), repeat                                | shuffle(seed + 1), repeat
        +-------------- MapDataset.mix(1 - text_weight, text_weight) ----------+
        | random_map(ExampleMaker): decode + resample audio, pick kind, task and prompt,
        |   interleave, tokenize, choose a bucket   -> Example, or Skipped(reason)
        | map_with_index: each example remembers its global index
        | to_iter_dataset (threads prefetch)
        | BucketBatchDataset: per-bucket buffers, a batch when a bucket fills, skip counters
        | mp_prefetch (optional worker processes)
        v
    batches (numpy, CONTRACT "The batch"), `to_global_arrays` -> jax.Arrays on the mesh

Everything random is drawn from Grain's per-index generators, so an example depends only
on (seed, index). That is what makes resume exact: the bucketing stage's state is its
parent's Grain state plus the *indices* of the examples waiting in its buffers and the
skip counters; on restore it rebuilds the waiting examples by random access. Saved with
Grain's orbax handler (`grain.checkpoint.CheckpointSave(iterator)`), a restored iterator
yields exactly the batch the uninterrupted one would have.

Bad data never stops a run: unreadable audio, empty transcripts, over-long examples and
missing teacher targets become `Skipped(reason)` and are counted; `PipelineStats` reads
the counters (and the sources' skipped lines) from the iterator state.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from speechlm_jax.data import interleave
from speechlm_jax.data.audio import AudioError, load_audio
from speechlm_jax.data.examples import (
    Audio,
    Example,
    ExampleError,
    Segment,
    Skipped,
    build_example,
    chat_segments,
    leading_space,
    prompt_segments,
)
from speechlm_jax.data.sources import Record, TargetTable, TFDSSource, librispeech_source, manifest_source, text_source
from speechlm_jax.data.tasks import TextTask, get_task
from speechlm_jax.data.tokenizer import SpeechTokenizer
from speechlm_jax.models.frontend import HOP_LENGTH, audio_token_count
from speechlm_jax.sharding import batch_sharding

SPEECH_KINDS = ("asr", "continuation", "imitation", "spoken_qa", "mixed_modal")
TEXT_KIND = "text_sft"
_COUNTS_KEY = "speechlm_counts"


@dataclasses.dataclass
class PipelineConfig:
    """What to read and how to shape it. Also accepts an ml_collections ConfigDict (`from_config`).

    speech_sources: dicts `{"type": "manifest" | "librispeech" | "tfds", "path": ...,
      "split": "train"}` (split only for tfds; defaults to the pipeline's split).
    text_sources / targets: JSONL paths (text-only SFT data; teacher responses).
    text_weight: fraction of text-only examples in the mixture (VoiceTextBlender: 0.15).
    text_loss: "response" (the assistant turn only, SFT) or "all" (every token of a
      text-only example: language modelling, for an LLM trained from scratch).
    kinds: weights of the speech example kinds (`SPEECH_KINDS`).
    tasks: text tasks for `imitation` and `mixed_modal` (registered names).
    use_task_answer: take those responses from `TextTask.answer` instead of the targets.
    prompt_split: "train" or "heldout" prompt phrasings.
    interleave_prob: probability that a speech example's content is interleaved
      (MTBI / SALAD) rather than fully spoken; ratio and span lengths as in `interleave`.
    buckets: static shapes `(audio_samples per slot, student tokens)`; max_slots slots per
      example; teacher_tokens the teacher twin's length.
    overlong: "drop" or "split" (a too-long clip becomes several consecutive slots).
    """

    speech_sources: tuple[Mapping[str, Any], ...] = ()
    text_sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    text_weight: float = 0.0
    text_loss: str = "response"
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
    num_epochs: int | None = None
    num_threads: int = 2
    prefetch_buffer_size: int = 16
    num_workers: int = 0

    def __post_init__(self):
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
        return tuple(dict.fromkeys(("asr", "continuation", "spoken_qa", *self.tasks, TEXT_KIND)))


class ConcatSource:
    """Several random-access sources read as one."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> Record:
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[k][index - self.offsets[k]]

    @property
    def skipped(self) -> Counter:
        return sum((Counter(s.skipped) for s in self.sources), Counter())


def open_speech_source(spec: Mapping[str, Any], split: str) -> Any:
    kind, path = spec["type"], spec["path"]
    if kind == "manifest":
        return manifest_source(path)
    if kind == "librispeech":
        return librispeech_source(path)
    if kind == "tfds":
        return TFDSSource(path, spec.get("split", split))
    raise ValueError(f"unknown speech source type {kind!r}")


class ExampleMaker:
    """The per-record map: a record and Grain's per-index rng -> `Example` or `Skipped`."""

    def __init__(self, config: PipelineConfig, tokenizer: SpeechTokenizer, targets: TargetTable):
        self.config = config
        self.tokenizer = tokenizer
        self.targets = targets
        self.kinds = tuple(k for k, w in config.kinds.items() if w > 0)
        weights = np.asarray([config.kinds[k] for k in self.kinds], np.float64)
        self.kind_p = weights / weights.sum()
        self.task_ids = {name: i for i, name in enumerate(config.task_names)}
        self.max_samples = config.buckets[-1][0]
        # The shortest clip that gives one audio token: shorter spoken spans stay text.
        self.min_samples = next(n for n in range(0, self.max_samples + 1, HOP_LENGTH)
                                if audio_token_count(n, config.downsample) >= 1)

    def __call__(self, record: Record, rng: np.random.Generator) -> Example | Skipped:
        try:
            if "messages" in record:
                segments = chat_segments(self.tokenizer, record["messages"],
                                         supervise_prompt=self.config.text_loss == "all")
                example = build_example(segments, self.tokenizer,
                                        downsample=self.config.downsample, task_id=self.task_ids[TEXT_KIND])
                split = False
            else:
                kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
                segments, task, split = self._speech_segments(kind, record, rng)
                example = build_example(segments, self.tokenizer, downsample=self.config.downsample,
                                        task_id=self.task_ids[task.name])
            example.split = split
            return self._bucketed(example)
        except ExampleError as e:
            return Skipped(e.reason)
        except (AudioError, OSError):
            return Skipped("bad_audio")

    def _bucketed(self, example: Example) -> Example:
        if example.num_teacher_tokens > self.config.teacher_tokens or len(example.audio) > self.config.max_slots:
            raise ExampleError("too_long")
        for b, (samples, tokens) in enumerate(self.config.buckets):
            if example.max_audio_samples <= samples and example.num_tokens <= tokens:
                example.bucket = b
                return example
        raise ExampleError("too_long")

    def _waveform(self, record: Record) -> np.ndarray:
        if record.get("waveform") is not None:
            waveform = np.asarray(record["waveform"], np.int16)
        else:
            waveform = load_audio(record["audio"], sample_rate=self.config.sample_rate)
        if waveform.size == 0:
            raise ExampleError("empty_audio")
        return waveform

    def _prompt_and_response(self, task: TextTask, record: Record, text: str,
                             rng: np.random.Generator) -> tuple[str, str]:
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

    def _speech_segments(self, kind: str, record: Record,
                         rng: np.random.Generator) -> tuple[list[Segment], TextTask, bool]:
        config = self.config
        text = " ".join(record.get("text", "").split())
        if not text:
            raise ExampleError("empty_text")
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
                spans = interleave.single_audio_span(len(words), rng, min_span=config.span_min,
                                                     max_span=config.span_max)
            else:
                spans = interleave.sample_spans(len(words), rng, ratio=config.interleave_ratio,
                                                min_span=config.span_min, max_span=config.span_max,
                                                max_audio_spans=config.max_slots)
            content = interleave.content_segments(
                waveform, words, spans, lead_space=space, max_samples=self.max_samples, split_long=split_long,
                sample_rate=config.sample_rate, margin_s=config.margin_s, min_samples=self.min_samples)

        else:
            content = interleave.whole_utterance(
                waveform, text, words, lead_space=space, max_samples=self.max_samples, split_long=split_long,
                sample_rate=config.sample_rate)
        # Spoken spans are separated by text, so adjacent slots are the pieces of a split one.
        split = any(isinstance(a, Audio) and isinstance(b, Audio) for a, b in zip(content, content[1:]))
        return prompt_segments(self.tokenizer, prompt, content, response), task, split


def collate(examples: Sequence[Example], bucket: tuple[int, int], *, batch_size: int, max_slots: int,
            teacher_tokens: int, downsample: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads examples into one batch of the bucket's static shape (CONTRACT "The batch").

    audio [B, S, L] int16; student arrays [B, T]; teacher arrays [B, U]; audio_labels
    [B, S, F + 1] each slot's transcript ids, -1 after its end (F = frames per slot; CTC
    aligns at most F labels, so a longer transcript is cut at F + 1, which CTC counts as
    infeasible); rows past `len(examples)` are padding with weight 0.
    """
    samples, length = bucket
    frames = audio_token_count(samples, downsample)
    shape, teacher_shape = (batch_size, length), (batch_size, teacher_tokens)
    batch = {
        "audio": np.zeros((batch_size, max_slots, samples), np.int16),
        "audio_lens": np.zeros((batch_size, max_slots), np.int32),
        "audio_labels": np.full((batch_size, max_slots, frames + 1), -1, np.int32),
        "tokens": np.full(shape, pad_id, np.int32),
        "positions": np.zeros(shape, np.int32),
        "input_mask": np.zeros(shape, np.int32),
        "audio_index": np.full(shape, -1, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "teacher_tokens": np.full(teacher_shape, pad_id, np.int32),
        "teacher_positions": np.zeros(teacher_shape, np.int32),
        "teacher_input_mask": np.zeros(teacher_shape, np.int32),
        "teacher_targets": np.full(teacher_shape, pad_id, np.int32),
        "teacher_loss_mask": np.zeros(teacher_shape, np.float32),
        "kl_mask": np.zeros(shape, np.float32),
        "teacher_index": np.zeros(shape, np.int32),
        "weight": np.zeros((batch_size,), np.float32),
        "task_id": np.zeros((batch_size,), np.int32),
    }
    for i, ex in enumerate(examples):
        n, m = ex.num_tokens, ex.num_teacher_tokens
        batch["tokens"][i, :n] = ex.tokens
        batch["positions"][i, :n] = np.arange(n)
        batch["input_mask"][i, :n] = 1
        batch["audio_index"][i, :n] = np.where(ex.audio_slot >= 0, ex.audio_slot * frames + ex.audio_frame, -1)
        batch["targets"][i, :n] = ex.targets
        batch["loss_mask"][i, :n] = ex.loss_mask
        batch["kl_mask"][i, :n] = ex.kl_mask
        batch["teacher_index"][i, :n] = ex.teacher_index
        batch["teacher_tokens"][i, :m] = ex.teacher_tokens
        batch["teacher_positions"][i, :m] = np.arange(m)
        batch["teacher_input_mask"][i, :m] = 1
        batch["teacher_targets"][i, :m] = ex.teacher_targets
        batch["teacher_loss_mask"][i, :m] = ex.teacher_loss_mask
        for k, clip in enumerate(ex.audio):
            batch["audio"][i, k, :len(clip)] = clip
            batch["audio_lens"][i, k] = len(clip)
        for k, ids in enumerate(ex.audio_labels):
            kept = ids[:frames + 1]
            batch["audio_labels"][i, k, :len(kept)] = kept
        batch["weight"][i] = 1.0
        batch["task_id"][i] = ex.task_id
    return batch


class BucketBatchDataset(grain.IterDataset):
    """Groups examples by bucket and emits a padded batch whenever a bucket fills.

    `examples` is the (unsliced) MapDataset the parent iterates; waiting examples are
    saved as their indices in it and rebuilt from it on restore. At the end of a finite
    input, `flush` emits the partly filled buckets (padding rows have weight 0).
    """

    def __init__(self, parent: grain.IterDataset, examples: grain.MapDataset, config: PipelineConfig,
                 *, pad_id: int, flush: bool):
        super().__init__(parent)
        self.examples = examples
        self.config = config
        self.pad_id = pad_id
        self.flush = flush

    def __iter__(self) -> _BucketBatchIterator:
        return _BucketBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"BucketBatchDataset(buckets={self.config.buckets}, batch_size={self.config.batch_size})"


class _BucketBatchIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, ds: BucketBatchDataset):
        super().__init__(parent)
        self._ds = ds
        self._buffers: list[list[Example]] = [[] for _ in ds.config.buckets]
        self._counts: Counter = Counter()
        self._exhausted = False

    def _batch(self, bucket: int) -> dict[str, np.ndarray]:
        examples, self._buffers[bucket] = self._buffers[bucket], []
        config = self._ds.config
        self._counts["batches"] += 1
        return collate(examples, config.buckets[bucket], batch_size=config.batch_size, max_slots=config.max_slots,
                       teacher_tokens=config.teacher_tokens, downsample=config.downsample, pad_id=self._ds.pad_id)

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._exhausted:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(item, Skipped):
                self._counts[f"skipped/{item.reason}"] += 1
                continue
            self._counts["examples"] += 1
            self._counts["split"] += int(item.split)
            self._buffers[item.bucket].append(item)
            if len(self._buffers[item.bucket]) == self._ds.config.batch_size:
                return self._batch(item.bucket)
        if self._ds.flush:
            for bucket, buffer in enumerate(self._buffers):
                if buffer:
                    return self._batch(bucket)
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffers": [[ex.index for ex in buffer] for buffer in self._buffers],
            _COUNTS_KEY: dict(self._counts),
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffers = [[self._ds.examples[i] for i in indices] for indices in state["buffers"]]
        self._counts = Counter(state[_COUNTS_KEY])
        self._exhausted = state["exhausted"]

    def __str__(self) -> str:
        return f"_BucketBatchIterator(buckets={self._ds.config.buckets})"


def _with_index(index: int, item: Example | Skipped) -> Example | Skipped:
    if isinstance(item, Example):
        item.index = index
    return item


def _prepared(ds: grain.MapDataset, *, train: bool, seed: int, num_epochs: int | None) -> grain.MapDataset:
    if train:
        return ds.shuffle(seed=seed).repeat(num_epochs)
    return ds


def build_dataset(config: PipelineConfig | Any, *, tokenizer: SpeechTokenizer, split: str = "train",
                  process_index: int = 0, process_count: int = 1,
                  seed: int = 0) -> tuple[grain.IterDataset, Counter]:
    """The pipeline as a Grain IterDataset of batches, and the sources' skipped-line counts.

    `split == "train"` shuffles and repeats (`config.num_epochs`, None = forever);
    any other split reads its shard once in order and flushes partial batches.
    """
    config = PipelineConfig.from_config(config)
    train = split == "train"
    speech = ConcatSource([open_speech_source(spec, split) for spec in config.speech_sources])
    text = ConcatSource([text_source(path) for path in config.text_sources])
    targets = TargetTable(tuple(config.targets))
    source_skipped = speech.skipped + text.skipped + targets.skipped
    host = slice(process_index, None, process_count)
    parts, weights = [], []
    if len(speech) and config.text_weight < 1.0:
        parts.append(_prepared(grain.MapDataset.source(speech)[host], train=train, seed=seed,
                               num_epochs=config.num_epochs))
        weights.append(1.0 - config.text_weight)
    if len(text) and config.text_weight > 0.0:
        parts.append(_prepared(grain.MapDataset.source(text)[host], train=train, seed=seed + 1,
                               num_epochs=config.num_epochs))
        weights.append(config.text_weight)
    if not parts:
        raise ValueError("the pipeline config names no readable speech or text data")
    records = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    examples = records.random_map(ExampleMaker(config, tokenizer, targets), seed=seed).map_with_index(_with_index)
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    ds = BucketBatchDataset(examples.to_iter_dataset(read), examples, config, pad_id=tokenizer.pad_id,
                            flush=not train)
    if config.num_workers > 0:
        # Grain's worker processes read absl flags; programs without absl.app never parse them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return ds, source_skipped


class PipelineStats:
    """Counts of examples, batches, splits and skips, read live from the iterator state.

    The counters are part of the checkpointed state, so they survive a resume; lines the
    sources could not parse are counted once, as `source_skipped/<reason>`.
    """

    def __init__(self, iterator: grain.DatasetIterator, source_skipped: Counter, task_names: tuple[str, ...]):
        self.iterator = iterator
        self.source_skipped = source_skipped
        self.task_names = task_names

    def as_dict(self) -> dict[str, int]:
        counts: Counter = Counter()

        def walk(node: Any) -> None:
            if isinstance(node, Mapping):
                for key, value in node.items():
                    if key == _COUNTS_KEY:
                        counts.update(value)
                    else:
                        walk(value)
            elif isinstance(node, (list, tuple)):
                for value in node:
                    walk(value)

        walk(self.iterator.get_state())
        counts.update({f"source_skipped/{k}": v for k, v in self.source_skipped.items()})
        counts["skipped"] = sum(v for k, v in counts.items() if "skipped/" in k)
        return dict(sorted(counts.items()))


def build_pipeline(config: PipelineConfig | Any, *, tokenizer: SpeechTokenizer, split: str = "train",
                   process_index: int | None = None, process_count: int | None = None,
                   seed: int = 0) -> tuple[grain.DatasetIterator, PipelineStats]:
    """This process's batch iterator (checkpointable with Grain's orbax handler) and its stats.

    The host shard defaults to this JAX process (`jax.process_index()` of
    `jax.process_count()`); tests pass other values to simulate several hosts.
    """
    config = PipelineConfig.from_config(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    ds, source_skipped = build_dataset(config, tokenizer=tokenizer, split=split, process_index=process_index,
                                       process_count=process_count, seed=seed)
    iterator = iter(ds)
    return iterator, PipelineStats(iterator, source_skipped, config.task_names)


def to_global_arrays(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's batch -> global jax.Arrays sharded over the mesh's batch axes."""
    return {key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for key, value in batch.items()}


def save_iterator(iterator: grain.DatasetIterator, directory: str | Path) -> None:
    """Writes the iterator state with Grain's orbax handler (one JSON file per process)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
        checkpointer.save(Path(directory), args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator(iterator: grain.DatasetIterator, directory: str | Path) -> grain.DatasetIterator:
    """Restores the state written by `save_iterator` into a freshly built iterator."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
        return checkpointer.restore(Path(directory), args=grain.checkpoint.CheckpointRestore(iterator))
