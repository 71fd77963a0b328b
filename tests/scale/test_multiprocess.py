"""Two local processes (4 simulated CPU devices each, coordinator on localhost) train the tiny
recipe exactly as one process on 8 devices does.

The two-process run goes through `launch/local.sh`, each process joining with
`speechlm_jax.distributed.initialize()` and reading its own half of the data
(`process_index::process_count`). The one-process reference feeds the trainer the same
global batches: host 0's shard and host 1's shard side by side, which is the order in
which `make_array_from_process_local_data` lays the two hosts' rows over the mesh.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np

from speechlm_jax import storage
from speechlm_jax.data import batching, pipeline
from speechlm_jax.train import data, trainer

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _losses(workdir: storage.PathLike) -> dict[int, float]:
    records = [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "metrics written by more than one process"
    return {r["step"]: r["loss"] for r in train}


def _two_host_batches(self: data.Data):
    """`Data.train_iterator` of a single process that reads what two hosts would, joined."""
    host = dataclasses.replace(self.train_config, batch_size=self.train_config.batch_size // 2)
    shards = [
        pipeline.build_dataset(
            host, tokenizer=self.tokenizer, split="train", process_index=i, process_count=2, seed=self.config.seed
        )[0]
        for i in range(2)
    ]
    joined = grain.experimental.ZipIterDataset(shards).map(
        lambda pair: {k: np.concatenate([pair[0][k], pair[1][k]]) for k in pair[0]}
    )
    iterator = iter(joined)
    return iterator, batching.PipelineStats(iterator, collections.Counter(), host.task_names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(corpus: Path, workdir: str | Path, cache: Path, logs: Path, *, steps: int, every: int = 0):
    """`launch/local.sh --processes 2 --cpu-devices 4` training the tiny asr recipe into `workdir`."""
    overrides = [
        f"--config={REPO}/configs/asr.py:tiny,data_dir={corpus}",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        f"--config.checkpoint.every={every}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress_bar=False",
        "--config.train.fast_compile=True",
        f"--config.train.compilation_cache={cache}",
        # A learning rate that does not depend on train.steps (warmup is capped by it): a run
        # stopped at step 2 and resumed to 3 follows the schedule of one run of 3 steps.
        "--config.optimizer.schedule=constant",
        "--config.optimizer.warmup_steps=0",
    ]
    env = dict(
        os.environ, PYTHONPATH=str(REPO), SPEECHLM_TRAIN=f"{sys.executable} {REPO}/tests/scale/distributed_train.py"
    )
    launch = [
        "bash",
        str(REPO / "launch/local.sh"),
        "--processes",
        "2",
        "--cpu-devices",
        "4",
        "--port",
        str(_free_port()),
        "--log-dir",
        str(logs),
        "--",
        *overrides,
    ]
    return subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200), logs


def test_two_processes_give_the_losses_of_one_and_resume_from_a_bucket(
    tiny_config, tiny_corpus, compilation_cache, gcs_bucket, tmp_path, monkeypatch
):
    """Two hosts train into a bucket, stop after step 2's checkpoint, resume, and match one process."""
    config = tiny_config("asr", steps=STEPS, log_every=1)
    config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
    with monkeypatch.context() as patch:
        patch.setattr(data.Data, "train_iterator", _two_host_batches)
        trainer.train(config, tmp_path / "one")

    workdir = f"{gcs_bucket}/runs/two"
    first, logs = _launch(tiny_corpus, workdir, compilation_cache, tmp_path / "first", steps=2, every=2)
    assert first.returncode == 0, first.stderr[-4000:] + (logs / "process_1.log").read_text()[-4000:]
    for i in range(2):
        log = (logs / f"process_{i}.log").read_text()
        assert f"process {i}/2: 4 local of 8 cpu devices" in log
        assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} on 8 devices" in log
    # Both hosts wrote their shards of step 2 and orbax committed it in the bucket (no local copy).
    assert (storage.path(workdir) / "checkpoints" / "2" / "trainable").is_dir()
    assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()

    second, logs = _launch(tiny_corpus, workdir, compilation_cache, tmp_path / "second", steps=STEPS)
    assert second.returncode == 0, second.stderr[-4000:] + (logs / "process_1.log").read_text()[-4000:]
    for i in range(2):
        assert "resumed from step 2" in (logs / f"process_{i}.log").read_text()
    # One line per step (only process 0 writes metrics), and the resumed step as one process's.
    one, two = _losses(tmp_path / "one"), _losses(workdir)
    assert one.keys() == two.keys() == set(range(1, STEPS + 1))
    np.testing.assert_allclose([two[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=1e-5, atol=1e-5)
    assert (storage.path(workdir) / "checkpoints" / str(STEPS) / "trainable").is_dir()
