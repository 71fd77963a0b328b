"""The Grain pipeline assembled: records -> examples -> static-shape batches, per host, resumable.

    mixture.host_mixture: this host's shard of the speech and text sources, mixed
        | random_map(maker.ExampleMaker)            -> Example, or Skipped(reason)
        | map_with_index: each example remembers its global index
        | to_iter_dataset (threads prefetch)
        | batching.BucketBatchDataset               -> padded batches, skip counters
        | mp_prefetch (optional worker processes)
        v
    batches (numpy, docs/ARCHITECTURE.md "The batch"), `batching.to_global_arrays` -> jax.Arrays

That is the whole data flow, sources -> examples -> buckets -> batches, one module per
stage; this one only connects them and checkpoints the result. Everything random is drawn
from Grain's per-index generators, so an example depends only on (seed, index). That is
what makes resume exact: the bucketing stage saves its parent's Grain state plus the
indices of the examples waiting in its buffers and the skip counters, and rebuilds the
waiting examples by random access on restore. Saved with Grain's orbax handler
(`save_iterator`, or `grain.checkpoint.CheckpointSave(iterator)` inside a CheckpointManager),
a restored iterator yields exactly the batch the uninterrupted one would have.

Bad data never stops a run: unreadable audio, empty transcripts, over-long examples and
missing teacher targets become `Skipped(reason)` and are counted; `batching.PipelineStats`
reads the counters (and the sources' skipped lines) from the iterator state.

Worker processes (`num_workers > 0`): Grain's multiprocess prefetch reads an absl flag
(`--grain_enable_multiprocess_worker_profiling`) in this process when it starts its
workers, which fails unless the program's absl flags have been parsed. Parsing flags is
the program's business, not this library's: absl programs (`absl.app.run`) have done it;
other entry points that start workers parse them first, as `speechlm-select` does
(`flags.FLAGS(sys.argv[:1])`). `build_dataset` checks this up front.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import grain
import jax
from absl import flags

from speechlm_jax import storage
from speechlm_jax.data.batching import BucketBatchDataset, PipelineStats
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.examples import Example, Skipped
from speechlm_jax.data.maker import ExampleMaker
from speechlm_jax.data.mixture import host_mixture
from speechlm_jax.data.tokenizer import SpeechTokenizer


def _with_index(index: int, item: Example | Skipped) -> Example | Skipped:
    if isinstance(item, Example):
        item.index = index
    return item


def build_dataset(
    config: PipelineConfig | Any,
    *,
    tokenizer: SpeechTokenizer,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
) -> tuple[grain.IterDataset, Counter]:
    """The pipeline as a Grain IterDataset of batches, and the sources' skipped-line counts.

    `split == "train"` shuffles and repeats (`config.num_epochs`, None = forever);
    any other split reads its shard once in order and flushes partial batches.
    """
    config = PipelineConfig.from_config(config)
    if config.num_workers > 0 and not flags.FLAGS.is_parsed():
        raise RuntimeError(
            "num_workers > 0 starts Grain worker processes, which read absl flags: parse them in the "
            "program first (absl.app.run, or flags.FLAGS(sys.argv[:1]) in a main without absl.app)"
        )
    mixture = host_mixture(config, split=split, process_index=process_index, process_count=process_count, seed=seed)
    examples = mixture.records.random_map(ExampleMaker(config, tokenizer, mixture.targets), seed=seed).map_with_index(
        _with_index
    )
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    train = split == "train"
    ds = BucketBatchDataset(
        examples.to_iter_dataset(read),
        examples,
        config,
        pad_id=tokenizer.pad_id,
        flush=not train,
        records_per_pass=mixture.records_per_pass if train else None,
    )
    if config.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return ds, mixture.source_skipped


def build_pipeline(
    config: PipelineConfig | Any,
    *,
    tokenizer: SpeechTokenizer,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int = 0,
) -> tuple[grain.DatasetIterator, PipelineStats]:
    """This process's batch iterator (checkpointable with Grain's orbax handler) and its stats.

    The host shard defaults to this JAX process (`jax.process_index()` of
    `jax.process_count()`); tests pass other values to simulate several hosts.
    """
    config = PipelineConfig.from_config(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    ds, source_skipped = build_dataset(
        config, tokenizer=tokenizer, split=split, process_index=process_index, process_count=process_count, seed=seed
    )
    iterator = iter(ds)
    return iterator, PipelineStats(iterator, source_skipped, config.task_names)


def save_iterator(iterator: grain.DatasetIterator, directory: str | Path) -> None:
    """Writes the iterator state with Grain's orbax handler (one JSON file per process)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
        checkpointer.save(storage.path(directory), args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator(iterator: grain.DatasetIterator, directory: str | Path) -> grain.DatasetIterator:
    """Restores the state written by `save_iterator` into a freshly built iterator."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
        return checkpointer.restore(storage.path(directory), args=grain.checkpoint.CheckpointRestore(iterator))
