"""The PairedSpeech TFDS builder: ArrayRecord without TensorFlow, equal to the folder it came from."""

from __future__ import annotations

import json
import sys

import numpy as np

from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.sources import TFDSSource, librispeech_source, manifest_source
from speechlm_jax.data.tfds_paired import prepare_paired_speech


def test_manifest_to_array_record_without_tensorflow(wav_manifest, tmp_path):
    rows = [json.loads(line) for line in wav_manifest.read_text().splitlines()]
    bad = dict(rows[0], id="gone", audio=str(tmp_path / "gone.wav"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(json.dumps(dict(r, audio=str(wav_manifest.parent / r["audio"]))) + "\n" for r in rows[:3])
        + json.dumps(bad)
        + "\n"
    )
    data_dir, skipped = prepare_paired_speech({"train": manifest}, tmp_path / "tfds")
    assert skipped == {"missing_file": 1}
    assert list(data_dir.glob("*.array_record*"))
    source = TFDSSource(data_dir, "train")
    expected = manifest_source(manifest)
    assert len(source) == 3
    for i in range(3):
        got, want = source[i], expected[i]
        assert (got["id"], got["text"], got["speaker"]) == (want["id"], want["text"], want["speaker"])
        np.testing.assert_array_equal(got["waveform"], load_audio(want["audio"]))
        assert [w["w"] for w in got["words"]] == [w["w"] for w in want["words"]]
        np.testing.assert_allclose([w["start"] for w in got["words"]], [w["start"] for w in want["words"]], atol=1e-6)
        assert abs(got["duration"] - len(got["waveform"]) / 16000) < 1e-5
    assert "tensorflow" not in sys.modules


def test_librispeech_folder_and_tfds_give_equal_examples(librispeech_corpus, word_tokenizer, tmp_path):
    root, _ = librispeech_corpus
    folder = librispeech_source(root)
    assert len(folder) == 4 and all(r["text"].isupper() for r in folder.records)
    data_dir, skipped = prepare_paired_speech({"train": root}, tmp_path / "tfds")
    assert not skipped
    tfds_source = TFDSSource(data_dir, "train")
    assert [tfds_source[i]["id"] for i in range(len(tfds_source))] == [r["id"] for r in folder.records]
    common = dict(
        buckets=((16000 * 6, 64),),
        max_slots=2,
        teacher_tokens=64,
        batch_size=2,
        downsample=4,
        num_threads=1,
        prefetch_buffer_size=2,
    )
    from_folder = PipelineConfig(speech_sources=({"type": "librispeech", "path": str(root)},), **common)
    from_tfds = PipelineConfig(speech_sources=({"type": "tfds", "path": str(data_dir)},), **common)
    batches = []
    for config in (from_folder, from_tfds):
        iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="train", seed=5)
        batches.append([next(iterator) for _ in range(3)])
        assert stats.as_dict()["skipped"] == 0
    for a, b in zip(*batches):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
