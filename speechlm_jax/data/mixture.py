"""The pipeline's first stage: the configured sources, opened and mixed into one host's records.

    speech sources (manifest, LibriSpeech, TFDS,            text-only JSONL           conversations JSONL
      HF datasets, Lhotse, NeMo)
        | host shard [process_index::process_count]            | host shard              | host shard
        | shuffle(seed), repeat                                | shuffle(seed + 1)       | shuffle(seed + 2)
        +---- MapDataset.mix(1 - text_weight - conversation_weight, text_weight, conversation_weight) ----+
        v
    records (a Grain MapDataset), read by `maker.ExampleMaker`

In the data flow (sources -> examples -> buckets -> batches) this is "sources": it opens
the speech, text and conversation sources and the teacher targets a `PipelineConfig` names, and counts
the lines they could not parse. Only the training split is shuffled and repeated; other
splits read their host shard once, in order.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from speechlm_jax.data.config import SPEECH_SOURCE_TYPES, PipelineConfig
from speechlm_jax.data.conversations import conversation_source
from speechlm_jax.data.corpus_manifests import lhotse_source, nemo_source
from speechlm_jax.data.hf_source import HFSource
from speechlm_jax.data.sources import Record, TargetTable, TFDSSource, librispeech_source, manifest_source, text_source


class ConcatSource:
    """Several random-access sources read as one."""

    def __init__(self, sources: Sequence[Any]) -> None:
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
    """A random-access speech source from a `PipelineConfig.speech_sources` entry."""
    kind, path = spec["type"], spec["path"]
    if kind == "manifest":
        return manifest_source(path)
    if kind == "librispeech":
        return librispeech_source(path)
    if kind == "tfds":
        return TFDSSource(path, spec.get("split", split))
    if kind == "hf":
        return HFSource(
            path,
            spec.get("split", split),
            audio_column=spec.get("audio_column", "audio"),
            text_column=spec.get("text_column", "text"),
        )
    if kind == "lhotse":
        return lhotse_source(path)
    if kind == "nemo":
        return nemo_source(path)
    raise ValueError(f"unknown speech source type {kind!r}; types: {', '.join(SPEECH_SOURCE_TYPES)}")


@dataclasses.dataclass(frozen=True)
class HostMixture:
    """One host's records, the teacher targets the examples look up, and the sources' skipped lines."""

    records: grain.MapDataset
    targets: TargetTable
    source_skipped: Counter
    records_per_pass: int = 0  # this host's records of every source, once each


def _prepared(ds: grain.MapDataset, *, train: bool, seed: int, num_epochs: int | None) -> grain.MapDataset:
    if train:
        return ds.shuffle(seed=seed).repeat(num_epochs)
    return ds


def host_mixture(
    config: PipelineConfig, *, split: str, process_index: int, process_count: int, seed: int
) -> HostMixture:
    """Opens the config's sources and mixes this host's shard of them (see the module docstring)."""
    train = split == "train"
    speech = ConcatSource([open_speech_source(spec, split) for spec in config.speech_sources])
    text = ConcatSource([text_source(path) for path in config.text_sources])
    conversations = ConcatSource([conversation_source(path) for path in config.conversation_sources])
    targets = TargetTable(tuple(config.targets))
    source_skipped = speech.skipped + text.skipped + conversations.skipped + targets.skipped
    host = slice(process_index, None, process_count)
    parts, weights = [], []
    speech_weight = 1.0 - config.text_weight - config.conversation_weight
    if len(speech) and speech_weight > 1e-9:
        parts.append(
            _prepared(grain.MapDataset.source(speech)[host], train=train, seed=seed, num_epochs=config.num_epochs)
        )
        weights.append(speech_weight)
    if len(text) and config.text_weight > 0.0:
        parts.append(
            _prepared(grain.MapDataset.source(text)[host], train=train, seed=seed + 1, num_epochs=config.num_epochs)
        )
        weights.append(config.text_weight)
    if len(conversations) and config.conversation_weight > 0.0:
        parts.append(
            _prepared(
                grain.MapDataset.source(conversations)[host], train=train, seed=seed + 2, num_epochs=config.num_epochs
            )
        )
        weights.append(config.conversation_weight)
    if not parts:
        raise ValueError("the pipeline config names no readable speech, text or conversation data")
    records = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    per_pass = sum(len(range(len(source))[host]) for source in (speech, text, conversations))
    return HostMixture(records, targets, source_skipped, records_per_pass=per_pass)
