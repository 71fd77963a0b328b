"""A TFDS builder for local paired speech corpora, written as ArrayRecord, read without TensorFlow.

`PairedSpeech` turns a JSONL manifest or a LibriSpeech-layout folder into a TFDS dataset
whose features need no TensorFlow to encode or decode: the decoded 16 kHz waveform as an
int16 Tensor, the transcript, speaker, duration and word timings (a Sequence of
`{"w", "start", "end"}`). `file_format="array_record"` makes it random-access, so the
pipeline reads it with `builder.as_data_source(split)` (`sources.TFDSSource`) straight into
a `grain.MapDataset`, with no audio decoding at training time.

    builder = PairedSpeech(splits={"train": "corpus/manifest.jsonl"}, data_dir="tfds")
    builder.download_and_prepare()
    source = TFDSSource(builder.data_dir, "train")

Records are written in source order (shuffling disabled) so a split reads like its
source. Audio that cannot be read is skipped and counted in `builder.skipped`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from speechlm_jax import storage
from speechlm_jax.data.audio import AudioError, load_audio
from speechlm_jax.data.sources import librispeech_source, manifest_source


def _open(path: str | Path) -> Any:
    """A manifest file or a LibriSpeech-layout folder."""
    path = storage.path(path)
    return librispeech_source(path) if path.is_dir() else manifest_source(path)


class PairedSpeech(tfds.core.GeneratorBasedBuilder):
    """Paired speech + transcript (+ word timings) from local files, TF-free features."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "int16 waveform, text, speaker, duration, word timings."}

    def __init__(
        self,
        *,
        splits: Mapping[str, str | Path] | None = None,
        sample_rate: int = 16000,
        file_format: str = "array_record",
        **kwargs: Any,
    ):
        self.splits = dict(splits or {})
        self.sample_rate = sample_rate
        self.skipped: Counter = Counter()
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local paired speech corpus (manifest or LibriSpeech layout).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "waveform": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "text": tfds.features.Text(),
                    "speaker": tfds.features.Text(),
                    "duration": tfds.features.Scalar(np.float32),
                    "words": tfds.features.Sequence(
                        {
                            "w": tfds.features.Text(),
                            "start": tfds.features.Scalar(np.float32),
                            "end": tfds.features.Scalar(np.float32),
                        }
                    ),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        if not self.splits:
            raise ValueError("PairedSpeech needs splits={name: manifest or LibriSpeech folder}")
        return {name: self._generate_examples(path) for name, path in self.splits.items()}

    def _generate_examples(self, path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
        source = _open(path)
        self.skipped.update(source.skipped)
        for record in source.records:
            try:
                waveform = load_audio(record["audio"], sample_rate=self.sample_rate)
            except AudioError as e:
                self.skipped[e.cause] += 1
                continue
            except OSError:
                self.skipped["unreadable"] += 1
                continue
            words = record["words"] or []
            yield (
                record["id"],
                {
                    "id": record["id"],
                    "waveform": waveform,
                    "text": record["text"],
                    "speaker": record["speaker"],
                    "duration": len(waveform) / self.sample_rate,
                    "words": [{"w": str(w["w"]), "start": float(w["start"]), "end": float(w["end"])} for w in words],
                },
            )


def prepare_paired_speech(
    splits: Mapping[str, str | Path], data_dir: str | Path, sample_rate: int = 16000
) -> tuple[Path, Counter]:
    """Builds (or reuses) the dataset under `data_dir`; returns its folder and the skip counts."""
    builder = PairedSpeech(splits=splits, data_dir=str(data_dir), sample_rate=sample_rate)
    builder.download_and_prepare()
    return Path(builder.data_dir), builder.skipped
