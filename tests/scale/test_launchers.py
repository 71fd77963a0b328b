"""The launchers' dry runs print exactly the commands a real launch runs (no cloud is touched)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--config", "configs/asr.py:paper", "--workdir", "/runs/a b"]
# A multi-host slice needs a bucket workdir.
POD_ARGS = ["--config", "configs/asr.py:paper", "--workdir", "gs://my-bucket/runs/a b"]


def _run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run(
        list(args), cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_local_single_process_runs_the_trainer_with_its_arguments():
    (line,) = _run("bash", "launch/local.sh", "--dry-run", "--", *TRAIN_ARGS)
    assert shlex.split(line) == ["env", "speechlm-train", *TRAIN_ARGS]


def test_local_simulated_cpu_devices():
    (line,) = _run("bash", "launch/local.sh", "--dry-run", "--cpu-devices", "8", "--", *TRAIN_ARGS)
    assert shlex.split(line) == [
        "env",
        "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8",
        "speechlm-train",
        *TRAIN_ARGS,
    ]


def test_local_processes_share_a_coordinator_and_differ_in_their_id():
    lines = _run(
        "bash",
        "launch/local.sh",
        "--dry-run",
        "--processes",
        "2",
        "--cpu-devices",
        "4",
        "--port",
        "4321",
        "--log-dir",
        "/l",
        "--",
        *TRAIN_ARGS,
    )
    assert len(lines) == 2
    for i, line in enumerate(lines):
        words = shlex.split(line.removesuffix("&"))
        assert words[:7] == [
            "env",
            "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "JAX_COORDINATOR_ADDRESS=localhost:4321",
            "JAX_NUM_PROCESSES=2",
            f"JAX_PROCESS_ID={i}",
            "speechlm-train",
        ]
        assert words[7:] == [*TRAIN_ARGS, ">", f"/l/process_{i}.log", "2>&1"]


def test_local_rejects_options_meant_for_the_trainer():
    result = subprocess.run(["bash", "launch/local.sh", "--config", "x"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "after --" in result.stderr


def _tpu_dry_run(tpu_type: str, *args: str, train: tuple[str, ...]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "launch/tpu_pod.py",
        "--name",
        "a",
        "--zone",
        "z",
        "--type",
        tpu_type,
        *args,
        "--dry-run",
    ]
    return subprocess.run(
        [*command, "--", "--config", "configs/asr.py:paper", *train], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "tpu_type, workdir, message",
    [
        ("v5p-64", ["--workdir", "/mnt/runs/asr"], "is a local path, but the run has 8 hosts"),
        ("v5litepod-16", ["--workdir=runs/asr"], "is a local path, but the run has 4 hosts"),
        ("v5p-8", ["--workdir", "ftp://host/runs/asr"], "the ftp:// scheme is not supported"),
        ("v5p-8", [], "no --workdir"),
    ],
)
def test_tpu_pod_refuses_a_workdir_the_run_cannot_share_before_creating_anything(tpu_type, workdir, message):
    result = _tpu_dry_run(tpu_type, train=tuple(workdir))
    assert result.returncode == 2 and message in result.stderr and not result.stdout


@pytest.mark.parametrize(
    "tpu_type, args, workdir",
    [
        ("v5p-64", (), "gs://my-bucket/runs/asr"),
        ("v5p-8", (), "/tmp/runs/asr"),  # one host: its own disk is the only one
        ("v5p-64", ("--shared-workdir",), "/mnt/filestore/runs/asr"),
    ],
)
def test_tpu_pod_accepts_a_bucket_or_a_single_host_or_a_declared_shared_path(tpu_type, args, workdir):
    result = _tpu_dry_run(tpu_type, *args, train=("--workdir", workdir))
    assert result.returncode == 0, result.stderr
    assert f"--workdir {workdir}" in result.stdout


def test_hosts_per_slice_follows_the_documented_topologies():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import tpu_pod
    finally:
        sys.path.pop(0)
    cases = {"v4-8": 1, "v4-32": 4, "v5p-8": 1, "v5p-64": 8, "v5litepod-8": 1, "v5litepod-64": 16, "v6e-8": 1}
    assert {t: tpu_pod.hosts_per_slice(t) for t in cases} == cases


def test_tpu_pod_plan_creates_copies_installs_runs_streams_and_stops():
    lines = _run(
        sys.executable,
        "launch/tpu_pod.py",
        "--name",
        "asr",
        "--zone",
        "us-east5-a",
        "--type",
        "v5p-64",
        "--dry-run",
        "--",
        *POD_ARGS,
    )
    commands = [shlex.split(line.removesuffix(" &")) for line in lines if not line.startswith("#")]
    zone = "--zone=us-east5-a"
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "asr", "--format=value(state)", zone]
    assert commands[1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "asr",
        "--accelerator-type=v5p-64",
        "--version=v2-alpha-tpuv5",
        zone,
    ]
    assert commands[2][:2] == ["tar", "-czf"] and "--exclude=.venv" in commands[2]
    assert commands[3] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "/tmp/speechlm_jax.tgz",
        "asr:/tmp/speechlm_jax.tgz",
        "--worker=all",
        zone,
    ]
    assert commands[4][4:7] == ["ssh", "asr", "--worker=all"] and "pip install -q -e '.[tpu]'" in commands[4][7]
    run = commands[5]
    assert run[4:7] == ["ssh", "asr", "--worker=all"]
    assert (
        ".venv/bin/speechlm-train --distributed --config configs/asr.py:paper --workdir 'gs://my-bucket/runs/a b'"
        in run[7]
    )
    assert lines[lines.index(shlex.join(run) + " &") + 1] == shlex.join(
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "asr",
            "--worker=0",
            "--command=tail -n +1 -F ~/speechlm_train.log",
            zone,
        ]
    )
    assert commands[-1][4:7] == ["ssh", "asr", "--worker=all"] and "kill $(cat ~/speechlm_train.pid)" in commands[-1][7]


def test_tpu_pod_multislice_uses_a_queued_resource_and_runs_every_node():
    lines = _run(
        sys.executable,
        "launch/tpu_pod.py",
        "--name",
        "big",
        "--zone",
        "z",
        "--type",
        "v6e-64",
        "--slices",
        "2",
        "--spot",
        "--project",
        "p",
        "--dry-run",
        "--",
        *POD_ARGS,
    )
    commands = [shlex.split(line.removesuffix(" &")) for line in lines if not line.startswith("#")]
    assert commands[1] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "big",
        "--accelerator-type=v6e-64",
        "--runtime-version=v2-alpha-tpuv6e",
        "--node-count=2",
        "--node-prefix=big",
        "--spot",
        "--zone=z",
        "--project=p",
    ]
    runs = [line for line in lines if line.endswith(" &")]
    assert [shlex.split(line)[5] for line in runs] == ["big-0", "big-1"]


def test_tpu_pod_needs_training_arguments():
    result = subprocess.run(
        [sys.executable, "launch/tpu_pod.py", "--name", "a", "--zone", "z", "--type", "v5p-8", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "after --" in result.stderr


def test_slurm_uses_jax_detection_by_default():
    lines = _run(
        "bash",
        "launch/gpu_slurm.sbatch",
        *TRAIN_ARGS,
        env={"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "4", "VENV": "/v", "XLA_FLAGS": ""},
    )
    assert (
        lines[0]
        == "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"
    )
    assert shlex.split(lines[1]) == [
        "srun",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "/v/bin/speechlm-train",
        "--distributed",
        *TRAIN_ARGS,
    ]


def test_slurm_explicit_coordinator_exports_each_tasks_rank():
    lines = _run(
        "bash",
        "launch/gpu_slurm.sbatch",
        *TRAIN_ARGS,
        env={"DRY_RUN": "1", "COORDINATOR": "node001:1234", "VENV": "/v"},
    )
    words = shlex.split(lines[1])
    assert words[:6] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    task, coordinator, *command = words[6:]
    assert coordinator == "node001:1234" and command == ["/v/bin/speechlm-train", "--distributed", *TRAIN_ARGS]
    # The task script really exports the rank Slurm gives each task.
    out = subprocess.run(
        ["bash", "-c", task, coordinator, "env"],
        env={"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    ).stdout
    assert {"JAX_COORDINATOR_ADDRESS=node001:1234", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1"} <= set(out.splitlines())
