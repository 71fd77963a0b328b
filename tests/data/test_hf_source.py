"""Hugging Face datasets as a source: `save_to_disk` folders and Parquet shards written by
`datasets` itself, read lazily row by row, locally and from a bucket (the Cloud Storage
emulator); bad rows skipped and counted; columns checked up front."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Audio, Dataset, DatasetDict

from speechlm_jax import storage
from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.corpus_manifests import nemo_source
from speechlm_jax.data.hf_source import HFSource, HFSourceError
from speechlm_jax.data.maker import record_audio
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.preflight import DataSourceError, check_sources


def _rows(manifest) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["audio"] = str(manifest.parent / row["audio"])
    return rows


def _dataset(rows: list[dict]) -> Dataset:
    table = {"id": [r["id"] for r in rows], "audio": [r["audio"] for r in rows], "text": [r["text"] for r in rows]}
    return Dataset.from_dict(table).cast_column("audio", Audio())


@pytest.fixture(scope="module")
def saved(wav_manifest, tmp_path_factory):
    """The WAV manifest's utterances as a Hugging Face dataset, saved every way this source reads:
    `save_to_disk` (audio bytes embedded; in one Arrow file and in three), `to_parquet` (audio
    paths), Parquet shards of the saved
    table (audio bytes, row groups of 3), and a `DatasetDict` of two splits."""
    root = tmp_path_factory.mktemp("hf")
    rows = _rows(wav_manifest)
    ds = _dataset(rows)
    ds.save_to_disk(str(root / "disk"))
    ds.save_to_disk(str(root / "disk_3"), num_shards=3)
    ds.to_parquet(str(root / "paths" / "train-00000-of-00001.parquet"))
    embedded = pa.concat_tables(
        pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in sorted((root / "disk").glob("*.arrow"))
    )
    (root / "shards" / "data").mkdir(parents=True)
    pq.write_table(embedded.slice(0, 6), root / "shards" / "data" / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(embedded.slice(6), root / "shards" / "data" / "train-00001-of-00002.parquet", row_group_size=3)
    pq.write_table(embedded.slice(0, 2), root / "shards" / "data" / "test-00000-of-00001.parquet")
    DatasetDict({"train": _dataset(rows[:7]), "test": _dataset(rows[7:])}).save_to_disk(str(root / "dict"))
    return root, rows


FORMS = ["disk", "disk_3", "paths", "shards", "shards/data/train-*.parquet"]


@pytest.mark.parametrize("form", FORMS)
def test_every_saved_form_reads_the_rows_and_their_audio(saved, form):
    root, rows = saved
    source = HFSource(str(root / form), "train")
    assert len(source) == len(rows) and source.skipped == {}
    assert source.kind == ("arrow" if form.startswith("disk") else "parquet")
    assert len(source.files) == {"disk_3": 3, "shards": 2}.get(form.split("/")[0], 1)
    for index, row in enumerate(rows):
        record = source[index]
        assert (record["id"], record["text"]) == (row["id"], row["text"])
        # Bytes inside the dataset, or the path it names: the audio of the WAV either way.
        assert (record["audio_bytes"] is None) == (form == "paths")
        np.testing.assert_array_equal(record_audio(record, 16000), load_audio(row["audio"]))
    # Grain's worker processes receive the source pickled: a file list, reopened there.
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 10_000
    assert copy[len(rows) - 1]["text"] == rows[-1]["text"]


def test_splits_of_a_dataset_dict_and_of_a_hub_layout(saved):
    root, rows = saved
    assert [HFSource(str(root / "dict"), "test")[i]["text"] for i in range(3)] == [r["text"] for r in rows[7:]]
    assert len(HFSource(str(root / "dict"), "train")) == 7
    assert len(HFSource(str(root / "shards"), "test")) == 2
    with pytest.raises(HFSourceError, match="without a 'validation' split"):
        HFSource(str(root / "dict"), "validation")


def test_opening_reads_no_audio(saved):
    root, rows = saved
    audio_bytes = sum(len(open(r["audio"], "rb").read()) for r in rows)
    before = pa.total_allocated_bytes()
    disk, shards = HFSource(str(root / "disk")), HFSource(str(root / "shards"))
    assert pa.total_allocated_bytes() - before < audio_bytes / 10
    # A Parquet row costs its row group (3 rows here), no more.
    shards[4]
    assert pa.total_allocated_bytes() - before < audio_bytes / 2
    assert disk[9]["audio_bytes"] == open(rows[9]["audio"], "rb").read()


def _config(spec: dict) -> PipelineConfig:
    return PipelineConfig(
        speech_sources=(spec,), buckets=((16000, 48), (48000, 64)), max_slots=3, teacher_tokens=64, batch_size=2
    )


def test_bad_rows_are_skipped_counted_and_named(saved, word_tokenizer, tmp_path, caplog):
    root, rows = saved
    good = _dataset(rows[:4]).to_dict()
    good["audio"] = [{"bytes": open(r["audio"], "rb").read(), "path": None} for r in rows[:4]]
    bad = {
        "id": ["garbage", "silent", "untranscribed"],
        "audio": [{"bytes": b"RIFF1234WAVEjunk" * 8, "path": None}, None, {"bytes": good["audio"][0]["bytes"]}],
        "text": ["hello world", "hello world", None],
    }
    table = {k: good[k] + bad[k] for k in ("id", "audio", "text")}
    Dataset.from_dict(table).cast_column("audio", Audio()).save_to_disk(str(tmp_path / "bad"))
    with caplog.at_level(logging.WARNING):
        source = HFSource(str(tmp_path / "bad"))
    assert source.skipped == {"no_transcript": 1} and len(source) == 6
    assert "1 rows without a transcript in 'text' (rows 6), skipped as no_transcript" in caplog.text
    assert source[4]["audio_source"].endswith(".arrow row 4")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        iterator, stats = build_pipeline(
            _config({"type": "hf", "path": str(tmp_path / "bad")}), tokenizer=word_tokenizer, split="eval"
        )
        batches = list(iterator)
    # The audio errors name the dataset file and row.
    assert "skipped (undecodable): " in caplog.text and ".arrow row 4: cannot decode" in caplog.text
    assert ".arrow row 5: names no audio" in caplog.text
    assert sum(int(b["weight"].sum()) for b in batches) == 4
    counts = stats.as_dict()
    assert counts["skipped/undecodable"] == 1 and counts["skipped/missing_file"] == 1
    assert counts["source_skipped/no_transcript"] == 1
    # Nothing lost: every row is an example or a counted skip.
    assert counts["examples"] + counts["skipped"] == len(table["id"])


def test_missing_or_mistyped_columns_fail_at_open_and_in_preflight(saved, tmp_path):
    root, rows = saved
    with pytest.raises(
        HFSourceError, match=r"train-00000-of-00002.parquet: no text column 'sentence' \(columns: id, audio, text\)"
    ):
        HFSource(str(root / "shards"), text_column="sentence")
    Dataset.from_dict({"audio": [1, 2], "text": ["a", "b"]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(HFSourceError, match="audio column 'audio' is int64, not an Audio feature"):
        HFSource(str(tmp_path / "ints"))
    with pytest.raises(HFSourceError, match="text column 'audio' is int64, not a string"):
        HFSource(str(tmp_path / "ints"), audio_column="text", text_column="audio")
    with pytest.raises(HFSourceError, match="no save_to_disk folder"):
        HFSource(str(tmp_path))

    def config(**spec):
        spec = {"type": "hf", "path": str(root / "disk"), **spec}
        return ml_collections.ConfigDict({"data": {"speech_sources": (spec,)}, "train": {"eval_every": 0}})

    check_sources(config())
    check_sources(config(path=str(root / "shards" / "data" / "train-*.parquet")))
    with pytest.raises(DataSourceError) as info:
        check_sources(config(audio_column="speech"))
    message = str(info.value)
    assert message.startswith("data.speech_sources[0] (hf): ") and "no audio column 'speech'" in message
    assert "\n" not in message and "data-00000-of-00001.arrow" in message
    with pytest.raises(DataSourceError, match="does not exist"):
        check_sources(config(path=str(tmp_path / "nowhere")))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + bytes(64))
    with pytest.raises(DataSourceError, match=r"\(hf\): cannot read: .*Parquet") as info:
        check_sources(config(path=str(tmp_path / "broken.parquet")))
    assert "\n" not in str(info.value)
    with pytest.raises(DataSourceError, match=r"unknown source type \(types: manifest, librispeech, tfds, hf"):
        check_sources(config(type="huggingface"))


def test_datasets_reads_back_what_this_source_reads(saved):
    # The reference reader: `datasets` itself, without decoding (the Audio feature's raw dicts).
    root, rows = saved
    reference = datasets.load_from_disk(str(root / "disk")).cast_column("audio", Audio(decode=False))
    source = HFSource(str(root / "disk"))
    for index in (0, 5, 9):
        assert source[index]["audio_bytes"] == reference[index]["audio"]["bytes"]
        assert source[index]["text"] == reference[index]["text"]


def test_a_relative_audio_path_is_relative_to_the_parquet_file(saved, tmp_path, monkeypatch):
    root, rows = saved
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.wav").write_bytes(open(rows[3]["audio"], "rb").read())
    # An Audio column {bytes, path} naming the file only (`datasets` would read the file to write it).
    audio = pa.array(
        [{"bytes": None, "path": "clips/a.wav"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    pq.write_table(pa.table({"audio": audio, "text": ["x"]}), tmp_path / "train.parquet")
    monkeypatch.chdir(root)  # not the working directory
    record = HFSource(str(tmp_path / "train.parquet"))[0]
    assert record["audio"] == str(tmp_path / "clips" / "a.wav")
    np.testing.assert_array_equal(record_audio(record, 16000), load_audio(rows[3]["audio"]))


def test_two_hosts_read_disjoint_rows_covering_the_shards(saved, word_tokenizer, sentences):
    root, rows = saved
    config = _config({"type": "hf", "path": str(root / "shards")})
    shards = []
    for process in range(2):
        iterator, _ = build_pipeline(
            config, tokenizer=word_tokenizer, split="eval", process_index=process, process_count=2
        )
        # The teacher twin's user turn holds the transcript.
        shards.append(
            {
                word_tokenizer.decode(b["teacher_tokens"][i][b["teacher_input_mask"][i] > 0])
                for b in iterator
                for i in range(2)
                if b["weight"][i] > 0
            }
        )
    assert len(shards[0]) == len(shards[1]) == len(rows) // 2 and not shards[0] & shards[1]
    assert {s for s in sentences for c in shards[0] | shards[1] if f" {s} " in f" {c} "} == set(sentences)


def test_the_saved_forms_and_a_nemo_manifest_are_read_from_a_bucket(saved, gcs_bucket, tmp_path):
    root, rows = saved
    disk = storage.upload(root / "disk", f"{gcs_bucket}/disk")
    shards = storage.upload(root / "shards", f"{gcs_bucket}/shards")
    for url, local in ((disk, root / "disk"), (shards, root / "shards"), (f"{shards}/data/train-*.parquet", None)):
        source, reference = HFSource(url), HFSource(str(local or root / "shards"))
        assert len(source) == len(reference) == len(rows)
        for index in (0, 7):
            got, expected = source[index], reference[index]
            assert got["audio_source"].startswith(gcs_bucket) and got["audio_bytes"] == expected["audio_bytes"]
            assert (got["id"], got["text"]) == (expected["id"], expected["text"])
    check_sources(
        ml_collections.ConfigDict({"data": {"speech_sources": ({"type": "hf", "path": shards},)}, "train": {}})
    )
    with pytest.raises(DataSourceError, match="no text column 'sentence'"):
        spec = {"type": "hf", "path": disk, "text_column": "sentence"}
        check_sources(ml_collections.ConfigDict({"data": {"speech_sources": (spec,)}, "train": {}}))

    # A NeMo manifest in the bucket names its audio beside it.
    (tmp_path / "nemo").mkdir()
    (tmp_path / "nemo" / "a.wav").write_bytes(open(rows[2]["audio"], "rb").read())
    line = {"audio_filepath": "a.wav", "offset": 0.1, "duration": 0.5, "text": rows[2]["text"]}
    (tmp_path / "nemo" / "manifest.json").write_text(json.dumps(line) + "\n")
    manifest = storage.upload(tmp_path / "nemo", f"{gcs_bucket}/nemo") + "/manifest.json"
    record = nemo_source(manifest)[0]
    assert record["audio"] == f"{gcs_bucket}/nemo/a.wav"
    np.testing.assert_array_equal(record_audio(record, 16000), load_audio(rows[2]["audio"])[1600:9600])


_WORKER_PROGRAM = """
import sys

import numpy as np
from absl import flags

from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.tokenizer import load_tokenizer


def batches(path, num_workers):
    config = PipelineConfig(speech_sources=({"type": "hf", "path": path},), buckets=((16000, 48), (48000, 64)),
                            max_slots=3, teacher_tokens=64, batch_size=2, num_threads=1, prefetch_buffer_size=2,
                            num_workers=num_workers)
    iterator, _ = build_pipeline(config, tokenizer=load_tokenizer(sys.argv[1]), split="eval")
    return list(iterator)


if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])
    for path in sys.argv[2:]:
        in_process, in_workers = batches(path, 0), batches(path, 1)
        assert len(in_workers) == len(in_process) > 0, (path, len(in_workers), len(in_process))
        for want, got in zip(in_process, in_workers):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    print("ok")
"""


def test_worker_processes_read_the_batches_read_in_process(saved, word_tokenizer, tmp_path):
    # Grain's worker processes receive the source pickled and reopen its files themselves.
    root, rows = saved
    program = tmp_path / "program.py"
    program.write_text(_WORKER_PROGRAM)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    # One form (the Parquet shards: a lock and file handles to rebuild); the pickle test above covers both.
    argv = [sys.executable, str(program), word_tokenizer.hf.name_or_path, str(root / "shards")]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    # (Grain's shared-memory buffers complain at interpreter exit; the program's own error is before.)
    errors = [line for line in result.stderr.splitlines() if "Error" in line and "mmap" not in line]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), errors[-20:]
