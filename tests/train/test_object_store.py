"""A run whose workdir and data are in a Cloud Storage bucket (a local emulator, no mocks).

The tiny corpus is uploaded to the bucket; `speechlm-train` trains from it into a gs:// workdir,
is killed with SIGKILL, and resumes to exactly the losses and data counters of an uninterrupted
local run (a local workdir's kill -9 points: `test_fault_injection.py`). The
run is then evaluated and exported from the bucket, and the export read back from it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from speechlm_jax import storage
from speechlm_jax.configs import asr
from speechlm_jax.convert import main as convert_main
from speechlm_jax.convert import workdir as convert_workdir
from speechlm_jax.data import sources
from speechlm_jax.data.audio import load_audio
from speechlm_jax.evaluation import main as eval_main
from speechlm_jax.models import hf_import
from speechlm_jax.train import restore, trainer

STEPS = 6


def _records(workdir: storage.PathLike) -> list[dict]:
    path = storage.path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _config(data_dir: str, compilation_cache: Path):
    config = asr.get_config(f"tiny,data_dir={data_dir}")
    config.train.update(
        steps=STEPS,
        log_every=1,
        eval_every=0,
        progress_bar=False,
        fast_compile=True,
        compilation_cache=str(compilation_cache),
    )
    config.optimizer.schedule = "constant"
    config.checkpoint.every = 2
    return config


def _no_local_url_folder(*folders: Path) -> None:
    for folder in folders:
        assert not any(p.name.endswith(":") for p in folder.iterdir()), f"a folder named like a URL scheme in {folder}"


def test_a_bucket_run_resumes_exactly_after_sigkill_and_is_evaluated_and_exported_there(
    gcs_bucket, tiny_corpus, compilation_cache, train_command, tmp_path
):
    reference_dir = tmp_path / "reference"
    trainer.train(_config(str(tiny_corpus), compilation_cache), reference_dir, devices=jax.devices()[:1])
    reference = {r["step"]: r for r in _records(reference_dir)}

    corpus = storage.upload(tiny_corpus, f"{gcs_bucket}/corpus")
    workdir = f"{gcs_bucket}/runs/asr"
    argv, env = train_command(
        f"asr.py:tiny,data_dir={corpus}",
        workdir,
        "--config.train.log_every=1",
        f"--config.train.steps={STEPS}",
        "--config.checkpoint.every=2",
        "--config.optimizer.schedule=constant",
    )
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not any(r["step"] >= 3 for r in _records(workdir)):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no step 3 within 600 s"
        time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    killed = _records(workdir)
    assert storage.path(workdir).joinpath("config.json").is_file()

    result = trainer.train(_config(corpus, compilation_cache), workdir, devices=jax.devices()[:1])
    resumed = _records(workdir)[len(killed) :]
    assert result.step == STEPS and resumed, "the restart trained no step"
    assert (resumed[0]["step"] - 1) % 2 == 0, f"resumed after step {resumed[0]['step'] - 1}, not a checkpoint"
    for record in resumed:
        ref = reference[record["step"]]
        assert abs(record["loss"] - ref["loss"]) <= 1e-6, (record["step"], record["loss"], ref["loss"])
        # The data continues exactly: the pipeline's counters (restored with the iterator) agree.
        assert {k: v for k, v in record.items() if k.startswith("data/")} == {
            k: v for k, v in ref.items() if k.startswith("data/")
        }
    assert sorted(storage.path(workdir).joinpath("checkpoints").iterdir())  # orbax's steps are in the bucket
    assert list(storage.path(workdir).joinpath("tensorboard", "train").iterdir()), "no TensorBoard events"

    report = eval_main.run(
        eval_main.parse_request(["--workdir", workdir, "--asr", "--asr_limit", "2", "--batch_size", "2"])
    )
    assert report["asr"]["utterances"] == 2 and report["model"]["step"] == STEPS
    saved = json.loads((storage.path(workdir) / "report.json").read_text())
    assert saved["asr"]["utterances"] == 2

    exported = f"{gcs_bucket}/export/asr"
    convert_main.run(["export", "--workdir", workdir, "--out", exported])
    assert (storage.path(exported) / "config.json").is_file()
    model, _ = convert_workdir.load_voxtral(exported)
    trained, _, _ = restore.load_model(workdir)
    for a, b in zip(jax.tree.leaves(nnx.state(model.projector)), jax.tree.leaves(nnx.state(trained.projector))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _no_local_url_folder(tmp_path, Path.cwd())


def test_an_hf_llm_folder_and_a_manifest_are_read_from_the_bucket(gcs_bucket, save_hf_model, tiny_corpus, tmp_path):
    save_hf_model("qwen2", tmp_path / "llm", tied=False)
    remote = storage.upload(tmp_path / "llm", f"{gcs_bucket}/llm")
    local_llm, bucket_llm = hf_import.load_llm(tmp_path / "llm"), hf_import.load_llm(remote)
    for a, b in zip(jax.tree.leaves(nnx.state(bucket_llm)), jax.tree.leaves(nnx.state(local_llm)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    manifest = storage.upload(tiny_corpus / "heldout", f"{gcs_bucket}/heldout") + "/manifest.jsonl"
    local, bucket = (
        sources.manifest_source(tiny_corpus / "heldout" / "manifest.jsonl"),
        sources.manifest_source(manifest),
    )
    assert len(bucket) == len(local) > 0 and not bucket.skipped
    for a, b in zip(local.records, bucket.records):
        assert b["audio"].startswith(f"{gcs_bucket}/heldout/") and {**b, "audio": a["audio"]} == a
    np.testing.assert_array_equal(load_audio(bucket[0]["audio"]), load_audio(local[0]["audio"]))


def test_a_tfds_dataset_and_a_librispeech_folder_are_read_from_the_bucket(gcs_bucket, tiny_corpus, tmp_path):
    from speechlm_jax.data.tfds_paired import prepare_paired_speech

    manifest = tiny_corpus / "heldout" / "manifest.jsonl"
    data_dir, _ = prepare_paired_speech({"train": manifest}, tmp_path / "tfds")
    local = sources.TFDSSource(data_dir, "train")
    bucket = sources.TFDSSource(storage.upload(data_dir, f"{gcs_bucket}/tfds"), "train")
    assert len(bucket) == len(local) > 0
    for i in range(len(local)):
        a, b = local[i], bucket[i]
        assert (a["id"], a["text"]) == (b["id"], b["text"])
        np.testing.assert_array_equal(a["waveform"], b["waveform"])

    # A LibriSpeech layout: speaker/chapter/speaker-chapter-utt.flac + speaker-chapter.trans.txt.
    chapter = tmp_path / "libri" / "19" / "198"
    chapter.mkdir(parents=True)
    records = sources.manifest_source(manifest).records[:2]
    lines = []
    for i, record in enumerate(records):
        (chapter / f"19-198-{i:04d}.flac").write_bytes(Path(record["audio"]).read_bytes())
        lines.append(f"19-198-{i:04d} {record['text'].upper()}")
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    (chapter / "19-198-0009.flac").write_bytes(Path(records[0]["audio"]).read_bytes())  # named by no line
    folder = sources.librispeech_source(storage.upload(tmp_path / "libri", f"{gcs_bucket}/libri"))
    assert [r["id"] for r in folder.records] == ["19-198-0000", "19-198-0001"]
    assert folder.skipped == {"no_transcript": 1}
    np.testing.assert_array_equal(load_audio(folder[1]["audio"]), load_audio(records[1]["audio"]))
