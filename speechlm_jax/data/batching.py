"""The pipeline's last stages: examples grouped by bucket and padded into static-shape batches.

    examples (from `maker`), each remembering its global index
        | BucketBatchDataset: per-bucket buffers, a batch when a bucket fills, skip counters
        v
    batches (numpy, docs/ARCHITECTURE.md "The batch"), `to_global_arrays` -> jax.Arrays on the mesh

In the data flow (sources -> examples -> buckets -> batches) this is "buckets -> batches".
`collate` pads examples into one batch of a bucket's shape. The bucketing stage's state is
its parent's Grain state plus the *indices* of the examples waiting in its buffers and the
skip counters; on restore it rebuilds the waiting examples by random access, which is what
makes resume exact. `PipelineStats` reads those counters back from the iterator state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from speechlm_jax import cli
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.examples import Example, Skipped
from speechlm_jax.models.frontend import audio_token_count
from speechlm_jax.sharding import batch_sharding

_COUNTS_KEY = "speechlm_counts"


def collate(
    examples: Sequence[Example],
    bucket: tuple[int, int],
    *,
    batch_size: int,
    max_slots: int,
    teacher_tokens: int,
    downsample: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Pads examples into one batch of the bucket's static shape (docs/ARCHITECTURE.md, "The batch").

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
            batch["audio"][i, k, : len(clip)] = clip
            batch["audio_lens"][i, k] = len(clip)
        for k, ids in enumerate(ex.audio_labels):
            kept = ids[: frames + 1]
            batch["audio_labels"][i, k, : len(kept)] = kept
        batch["weight"][i] = 1.0
        batch["task_id"][i] = ex.task_id
    return batch


_REPORTED_PER_CAUSE = 10  # skip messages logged per cause; the counters count them all


def _report_skip(skipped: Skipped, count: int) -> None:
    """Logs what was skipped and why (the first few of each cause, so an epoch of bad files
    does not flood the log)."""
    if skipped.message and count <= _REPORTED_PER_CAUSE:
        last = " (further ones are only counted)" if count == _REPORTED_PER_CAUSE else ""
        logging.warning("skipped (%s): %s%s", skipped.reason, skipped.message, last)


class NoExamplesError(cli.UsageError):
    """A whole pass over the data was skipped: no record makes an example (exit status 2)."""


class BucketBatchDataset(grain.IterDataset):
    """Groups examples by bucket and emits a padded batch whenever a bucket fills.

    `examples` is the (unsliced) MapDataset the parent iterates; waiting examples are
    saved as their indices in it and rebuilt from it on restore. At the end of a finite
    input, `flush` emits the partly filled buckets (padding rows have weight 0). A repeated
    input that skips twice `records_per_pass` records in a row raises NoExamplesError instead
    of reading on forever (every audio path wrong, say): a shuffled pass holds every record
    once, so with one good record the longest run of skips, across a pass's end, is shorter.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        examples: grain.MapDataset,
        config: PipelineConfig,
        *,
        pad_id: int,
        flush: bool,
        records_per_pass: int | None = None,
    ) -> None:
        super().__init__(parent)
        self.examples = examples
        self.config = config
        self.pad_id = pad_id
        self.flush = flush
        self.records_per_pass = records_per_pass

    def __iter__(self) -> _BucketBatchIterator:
        return _BucketBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"BucketBatchDataset(buckets={self.config.buckets}, batch_size={self.config.batch_size})"


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: BucketBatchDataset) -> None:
        super().__init__(parent)
        self._ds = ds
        self._buffers: list[list[Example]] = [[] for _ in ds.config.buckets]
        self._counts: Counter = Counter()
        self._exhausted = False
        self._skipped_in_a_row = 0  # not checkpointed: after a restore the count starts again

    def _batch(self, bucket: int) -> dict[str, np.ndarray]:
        examples, self._buffers[bucket] = self._buffers[bucket], []
        config = self._ds.config
        self._counts["batches"] += 1
        return collate(
            examples,
            config.buckets[bucket],
            batch_size=config.batch_size,
            max_slots=config.max_slots,
            teacher_tokens=config.teacher_tokens,
            downsample=config.downsample,
            pad_id=self._ds.pad_id,
        )

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._exhausted:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(item, Skipped):
                self._counts[f"skipped/{item.reason}"] += 1
                _report_skip(item, self._counts[f"skipped/{item.reason}"])
                self._skipped_in_a_row += 1
                if self._ds.records_per_pass and self._skipped_in_a_row >= 2 * self._ds.records_per_pass:
                    raise self._no_examples()
                continue
            self._skipped_in_a_row = 0
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

    def _no_examples(self) -> NoExamplesError:
        skips = sorted((k.removeprefix("skipped/"), n) for k, n in self._counts.items() if k.startswith("skipped/"))
        return NoExamplesError(
            f"no example in {self._skipped_in_a_row} records in a row, two passes over the "
            f"{self._ds.records_per_pass} records this process reads: every one was skipped "
            f"({', '.join(f'{cause} {n}' for cause, n in skips)}); the warnings above name the first of each cause"
        )

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


class PipelineStats:
    """Counts of examples, batches, splits and skips, read live from the iterator state.

    `skipped/<cause>` counts the examples skipped for that cause (`maker`'s list), each time
    one is read, so once per epoch; the counters are part of the checkpointed state, so they
    survive a resume. What the sources could not turn into records is counted once, as
    `source_skipped/<cause>` (`sources`' list); `skipped` is the total of both.
    """

    def __init__(self, iterator: grain.DatasetIterator, source_skipped: Counter, task_names: tuple[str, ...]) -> None:
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


def to_global_arrays(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's batch -> global jax.Arrays sharded over the mesh's batch axes."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for key, value in batch.items()
    }
