"""storage.py: one path layer for local folders and gs:// buckets, tested locally and against a
Cloud Storage emulator (tools/gcs_emulator.py, the `gcs_bucket` fixture): paths, write-then-publish,
the append-only file, the synced folder, local copies and orbax checkpoints, each read back
through another client than the one that wrote it where there is one (no mocks)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from speechlm_jax import storage


def _blobs(bucket_url: str, prefix: str = "") -> dict[str, bytes]:
    """{name: content} of the objects under `prefix`, read with google-cloud-storage (not gcsfs)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="test", credentials=AnonymousCredentials())
    bucket = bucket_url.removeprefix("gs://")
    return {blob.name: blob.download_as_bytes() for blob in client.list_blobs(bucket, prefix=prefix)}


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test runs in an empty folder, so that a path taken for a local one shows up in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# -- What any path is -----------------------------------------------------------------------


def test_schemes_and_refusals(in_tmp_cwd: Path):
    assert storage.scheme("gs://b/k") == "gs" and storage.scheme("GS://b") == "gs"
    assert storage.scheme("/a/b") is None and storage.scheme("a/gs://b") is None
    assert storage.is_remote("gs://b/k") and not storage.is_remote("relative/x")
    for bad, reason in [("ftp://x/y", "ftp:// scheme is not supported"), ("gs://", "names no bucket")]:
        with pytest.raises(storage.UnsupportedPath, match=reason):
            storage.path(bad)
        with pytest.raises(storage.UnsupportedPath):
            storage.write_text(bad + "/f", "x") if bad != "gs://" else storage.write_text(bad, "x")
    assert isinstance(storage.UnsupportedPath("x"), ValueError)  # a usage error (cli.UsageError)
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.join("run", "a") == os.path.join("run", "a")
    assert list(in_tmp_cwd.iterdir()) == []  # nothing was written: never a folder named 'gs:' or 'ftp:'


# -- Local paths ----------------------------------------------------------------------------


def test_local_write_publishes_whole_files(tmp_path: Path):
    target = tmp_path / "sub" / "config.json"
    storage.write_text(target, "first")
    storage.write_text(target, "second")
    storage.write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert target.read_text() == "second" and (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.bin", "config.json"]  # no temporaries left


def test_local_appender_and_synced_dir(tmp_path: Path):
    log = storage.Appender(tmp_path / "run" / "metrics.jsonl")
    for step in range(3):
        log.append(json.dumps({"step": step}) + "\n")
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        2,
    ]
    synced = storage.SyncedDir(tmp_path / "run" / "tb")
    assert not synced.remote and synced.local == tmp_path / "run" / "tb"  # the folder itself
    synced.local.mkdir(parents=True)
    (synced.local / "events").write_text("e")
    synced.close()
    assert (tmp_path / "run" / "tb" / "events").read_text() == "e"  # close keeps a local target
    assert storage.local_copy(tmp_path / "run") == tmp_path / "run"
    with storage.opened(tmp_path / "run" / "metrics.jsonl", "r") as f:
        assert f.readline() == '{"step": 0}\n'


# -- gs:// on the emulator ------------------------------------------------------------------


def test_gcs_paths(gcs_bucket: str, in_tmp_cwd: Path):
    run = storage.path(f"{gcs_bucket}/run")
    assert not run.exists()
    storage.write_text(f"{gcs_bucket}/run/config.json", '{"a": 1}')
    storage.write_bytes(f"{gcs_bucket}/run/eval/step_1/scores.bin", b"\x01\x02")
    storage.write_text(f"{gcs_bucket}/run/eval/step_2/report.json", "{}")
    assert run.exists() and run.is_dir() and (run / "config.json").is_file()
    assert json.loads((run / "config.json").read_text()) == {"a": 1}
    assert (run / "eval" / "step_1" / "scores.bin").read_bytes() == b"\x01\x02"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "eval"]
    assert sorted(os.fspath(p) for p in run.glob("eval/*/*.json")) == [f"{gcs_bucket}/run/eval/step_2/report.json"]
    # epath's walk yields a bucket's folders without their scheme ("bucket/run/eval", a string
    # that `epath.Path` would take for a local path): compared here by bucket and key only.
    walked = {os.fspath(root).removeprefix("gs://"): (sorted(dirs), sorted(files)) for root, dirs, files in run.walk()}
    bucket = gcs_bucket.removeprefix("gs://")
    assert walked == {
        f"{bucket}/run": (["eval"], ["config.json"]),
        f"{bucket}/run/eval": (["step_1", "step_2"], []),
        f"{bucket}/run/eval/step_1": ([], ["scores.bin"]),
        f"{bucket}/run/eval/step_2": ([], ["report.json"]),
    }
    with storage.opened(f"{gcs_bucket}/run/config.json", "r") as f:
        assert json.load(f) == {"a": 1}
    assert set(_blobs(gcs_bucket)) == {"run/config.json", "run/eval/step_1/scores.bin", "run/eval/step_2/report.json"}
    (run / "eval").rmtree()
    assert not (run / "eval").exists() and set(_blobs(gcs_bucket)) == {"run/config.json"}
    assert list(in_tmp_cwd.iterdir()) == []  # all of it went to the bucket, no local 'gs:' folder


def test_gcs_write_text_publishes_one_object(gcs_bucket: str):
    storage.write_text(f"{gcs_bucket}/run/config.json", "first")
    storage.write_text(f"{gcs_bucket}/run/config.json", "second")
    assert _blobs(gcs_bucket) == {"run/config.json": b"second"}  # the new content, no temporaries beside it
    large = os.urandom(9 << 20)  # over gcsfs's single-request size: a resumable upload
    storage.write_bytes(f"{gcs_bucket}/big.bin", large)
    assert _blobs(gcs_bucket, "big")["big.bin"] == large


def test_gcs_subprocesses_share_the_bucket(gcs_bucket: str, gcs_env: dict[str, str]):
    """A subprocess inherits the emulator's environment, and a folder listed before another
    process wrote into it is listed anew (gcsfs's listings cache is off)."""
    import subprocess
    import sys

    run = storage.path(f"{gcs_bucket}/run")
    storage.write_text(f"{gcs_bucket}/run/a.txt", "a")
    assert [p.name for p in run.iterdir()] == ["a.txt"]
    assert all(os.environ[key] == value for key, value in gcs_env.items())
    code = "import sys; from speechlm_jax import storage; storage.write_text(sys.argv[1], 'b')"
    subprocess.run([sys.executable, "-c", code, f"{gcs_bucket}/run/b.txt"], check=True, timeout=120)
    assert sorted(p.name for p in run.iterdir()) == ["a.txt", "b.txt"]
    assert (run / "b.txt").read_text() == "b"


def test_gcs_rename_is_quick(gcs_bucket: str):
    """gcsfs's objects.move (emulator fix 2): without it each move waits ~30 s of retries."""
    source = storage.path(f"{gcs_bucket}/a.txt")
    source.write_text("x")
    start = time.monotonic()
    source.rename(f"{gcs_bucket}/b.txt")
    assert time.monotonic() - start < 5
    assert _blobs(gcs_bucket) == {"b.txt": b"x"}


def test_gcs_generation_preconditions(gcs_bucket: str):
    """An upload with ifGenerationMatch is refused when the object changed (emulator fix 3), as
    tensorstore's atomic writes expect."""
    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    bucket = gcs.Client(project="test", credentials=AnonymousCredentials()).bucket(gcs_bucket.removeprefix("gs://"))
    blob = bucket.blob("manifest")
    blob.upload_from_string(b"one", if_generation_match=0)
    generation = bucket.get_blob("manifest").generation
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"two", if_generation_match=0)  # exists already
    blob.upload_from_string(b"two", if_generation_match=generation)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"three", if_generation_match=generation)  # a stale generation
    assert blob.download_as_bytes() == b"two"


def test_gcs_appender(gcs_bucket: str):
    target = f"{gcs_bucket}/run/metrics.jsonl"
    log = storage.Appender(target)
    for step in range(3):
        log.append(json.dumps({"step": step}) + "\n")
        assert _blobs(gcs_bucket)["run/metrics.jsonl"].count(b"\n") == step + 1  # visible after each append
    storage.Appender(target).append('{"step": 3}\n')  # a resumed run continues the file
    lines = storage.path(target).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_gcs_synced_dir(gcs_bucket: str):
    synced = storage.SyncedDir(f"{gcs_bucket}/run/tensorboard")
    assert synced.remote and synced.local.is_dir()
    (synced.local / "events.out.1").write_bytes(b"a")
    (synced.local / "eval").mkdir()
    (synced.local / "eval" / "events.out.2").write_bytes(b"b")
    synced.sync()
    assert _blobs(gcs_bucket) == {"run/tensorboard/events.out.1": b"a", "run/tensorboard/eval/events.out.2": b"b"}
    with (synced.local / "events.out.1").open("ab") as f:
        f.write(b"c")
    synced.sync()
    assert _blobs(gcs_bucket)["run/tensorboard/events.out.1"] == b"ac"
    local = synced.local
    synced.close()
    assert not local.exists()


def test_gcs_local_copy(gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPEECHLM_STORAGE_CACHE", str(tmp_path / "cache"))
    storage.write_text(f"{gcs_bucket}/tok/tokenizer.json", '{"v": 1}')
    storage.write_bytes(f"{gcs_bucket}/tok/sub/vocab.bin", b"\x07")
    storage.write_bytes(f"{gcs_bucket}/model.safetensors", b"weights")
    folder = storage.local_copy(f"{gcs_bucket}/tok")
    assert folder.is_dir() and folder.is_relative_to(tmp_path / "cache")
    assert (folder / "tokenizer.json").read_text() == '{"v": 1}' and (
        folder / "sub" / "vocab.bin"
    ).read_bytes() == b"\x07"
    file = storage.local_copy(f"{gcs_bucket}/model.safetensors")
    assert file.is_file() and file.read_bytes() == b"weights"
    assert storage.local_copy(f"{gcs_bucket}/tok") == folder  # once per process
    with pytest.raises(FileNotFoundError):
        storage.local_copy(f"{gcs_bucket}/missing")


def test_gcs_local_copy_by_processes_at_once(gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Processes on one host (one per GPU) copying the same folder at once all get it."""
    import subprocess
    import sys

    monkeypatch.setenv("SPEECHLM_STORAGE_CACHE", str(tmp_path / "cache"))
    for i in range(40):
        storage.write_text(f"{gcs_bucket}/tok/f{i}.txt", str(i))
    code = "import sys; from speechlm_jax import storage; print(len(list(storage.local_copy(sys.argv[1]).iterdir())))"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, f"{gcs_bucket}/tok"], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0] and outputs == ["40", "40", "40"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(storage.local_copy(f"{gcs_bucket}/tok")).name]


def test_gcs_orbax_checkpoints(gcs_bucket: str, in_tmp_cwd: Path):
    """An orbax CheckpointManager on gs:// with train.checkpoint's items (arrays through
    tensorstore, JSON and the Grain iterator through epath): steps listed and restored."""
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    directory = storage.path(f"{gcs_bucket}/run/checkpoints")

    def manager(**options):
        return ocp.CheckpointManager(
            directory,
            item_names=("trainable", "meta", "data"),
            item_handlers={"data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(create=False, **options),
        )

    dataset = grain.MapDataset.range(64).shuffle(seed=3).batch(4).to_iter_dataset()
    iterator = iter(dataset)
    trees = {}
    saver = manager(max_to_keep=2, enable_async_checkpointing=True)
    for step in (1, 2, 3):
        next(iterator)
        trees[step] = {
            "lora": {"a": jnp.full((8, 4), step, jnp.float32), "b": jnp.arange(12, dtype=jnp.bfloat16) * step}
        }
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(trees[step]),
            meta=ocp.args.JsonSave({"step": step}),
            data=grain.checkpoint.CheckpointSave(iterator),
        )
        assert saver.save(step, args=args, force=True)
        saver.wait_until_finished()
    following = next(iterator)
    assert saver.latest_step() == 3 and list(saver.all_steps()) == [2, 3]  # keep 2: step 1 deleted
    saver.close()

    names = set(_blobs(gcs_bucket, "run/checkpoints/"))
    assert {"run/checkpoints/3/commit_success.txt", "run/checkpoints/3/meta/metadata"} <= names
    assert not any(name.startswith("run/checkpoints/1/") for name in names)

    restorer = manager()  # a new process would see the same: nothing cached
    assert restorer.latest_step() == 3 and list(restorer.all_steps()) == [2, 3]
    restored_iterator = iter(dataset)
    restored = restorer.restore(
        3,
        args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, trees[3])),
            meta=ocp.args.JsonRestore(),
            data=grain.checkpoint.CheckpointRestore(restored_iterator),
        ),
    )
    restorer.close()
    assert dict(restored.meta) == {"step": 3}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.trainable, trees[3])
    assert restored.trainable["lora"]["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(next(restored_iterator), following)  # the data continues after step 3
    assert list(in_tmp_cwd.iterdir()) == []


def test_s3_is_refused_with_its_reason_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.UnsupportedPath, match=r"s3:// paths are not supported: orbax .* cannot checkpoint"):
        storage.path("s3://bucket/run")
    assert not list(tmp_path.iterdir())
