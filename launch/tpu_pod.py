#!/usr/bin/env python3
"""Runs `speechlm-train` on every worker of a Cloud TPU slice (or of several, multislice).

    python launch/tpu_pod.py --name asr-v5p --zone us-east5-a --type v5p-64 \\
        -- --config configs/asr.py:paper --workdir gs://my-bucket/runs/asr

Steps, each one `gcloud` command (`--dry-run` prints them all, exactly, and runs none):

  1. reuse the TPU VM (or queued resource) if `describe` finds it, else create it: a TPU VM
     for one slice, a queued resource with `--node-count` for `--slices` > 1 (or `--queued`);
     queued resources are waited on until ACTIVE
  2. pack this checkout (without .git and .venv), copy it to every worker of every node and
     install it there (`pip install -e '.[tpu]'`, i.e. jax with libtpu)
  3. start `speechlm-train --distributed <args>` on all workers of all nodes at once (each
     worker writes its log to ~/speechlm_train.log); JAX joins the workers through the TPU
     metadata, multislice through the MEGASCALE variables the queued resource sets
  4. stream worker 0's log here; when any node's run fails, stop the run on every worker
     and exit with its status

The workdir of a multi-host slice (or of several slices) must be a bucket path (gs://...): the
workers share no local disk, orbax writes each worker's checkpoint shards to one shared place,
and a TPU VM's disk goes with it at preemption. A local path is refused there before anything is
created, unless `--shared-workdir` says it is a filesystem every worker mounts (NFS, Filestore).

Runs only this script's own `gcloud` processes locally; nothing here is tested against a
real cloud: the tests check the dry-run commands.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = "/tmp/speechlm_jax.tgz"
REMOTE_DIR = "~/speechlm_jax"
REMOTE_LOG = "~/speechlm_train.log"
REMOTE_PID = "~/speechlm_train.pid"
# The TPU VM software versions Cloud TPU documents for each generation.
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


@dataclass
class Pod:
    """What to create and run, from the command line."""

    name: str
    zone: str
    accelerator: str
    runtime: str
    project: str = ""
    slices: int = 1
    queued: bool = False
    spot: bool = False
    train_args: list[str] = field(default_factory=list)

    @property
    def uses_queued_resource(self) -> bool:
        return self.queued or self.slices > 1

    @property
    def nodes(self) -> list[str]:
        """TPU VM names: the queued resource's nodes are `<name>-<i>`, a plain TPU VM is `<name>`."""
        return [f"{self.name}-{i}" for i in range(self.slices)] if self.uses_queued_resource else [self.name]

    def gcloud(self, *args: str) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", *args, f"--zone={self.zone}", *project]


def describe_command(pod: Pod) -> list[str]:
    if pod.uses_queued_resource:
        return pod.gcloud("queued-resources", "describe", pod.name, "--format=value(state.state)")
    return pod.gcloud("tpu-vm", "describe", pod.name, "--format=value(state)")


def create_command(pod: Pod) -> list[str]:
    spot = ["--spot"] if pod.spot else []
    if pod.uses_queued_resource:
        return pod.gcloud(
            "queued-resources",
            "create",
            pod.name,
            f"--accelerator-type={pod.accelerator}",
            f"--runtime-version={pod.runtime}",
            f"--node-count={pod.slices}",
            f"--node-prefix={pod.name}",
            *spot,
        )
    return pod.gcloud(
        "tpu-vm", "create", pod.name, f"--accelerator-type={pod.accelerator}", f"--version={pod.runtime}", *spot
    )


def ssh(pod: Pod, node: str, command: str, worker: str = "all") -> list[str]:
    return pod.gcloud("tpu-vm", "ssh", node, f"--worker={worker}", f"--command={command}")


def pack_command() -> list[str]:
    return ["tar", "-czf", ARCHIVE, "--exclude=.git", "--exclude=.venv", "--exclude=logs", "-C", str(REPO), "."]


def copy_commands(pod: Pod) -> list[list[str]]:
    return [pod.gcloud("tpu-vm", "scp", ARCHIVE, f"{node}:{ARCHIVE}", "--worker=all") for node in pod.nodes]


def install_commands(pod: Pod) -> list[list[str]]:
    install = (
        f"mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
        "python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
    )
    return [ssh(pod, node, install) for node in pod.nodes]


def train_remote_command(pod: Pod) -> str:
    """What each worker runs: the trainer in the background, its pid recorded, its status returned."""
    args = " ".join(shlex.quote(a) for a in ["--distributed", *pod.train_args])
    return f"cd {REMOTE_DIR} && .venv/bin/speechlm-train {args} > {REMOTE_LOG} 2>&1 & echo $! > {REMOTE_PID}; wait $!"


def train_commands(pod: Pod) -> list[list[str]]:
    return [ssh(pod, node, train_remote_command(pod)) for node in pod.nodes]


def stream_command(pod: Pod) -> list[str]:
    return ssh(pod, pod.nodes[0], f"tail -n +1 -F {REMOTE_LOG}", worker="0")


def stop_commands(pod: Pod) -> list[list[str]]:
    return [ssh(pod, node, f"kill $(cat {REMOTE_PID}) 2>/dev/null || true") for node in pod.nodes]


def _show(command: list[str], note: str = "") -> str:
    return (f"# {note}\n" if note else "") + shlex.join(command)


def plan(pod: Pod) -> list[str]:
    """Every command of a launch in order, as shell lines (what --dry-run prints)."""
    lines = [
        _show(describe_command(pod), "reuse the slice when this succeeds, otherwise create it:"),
        _show(create_command(pod)),
    ]
    if pod.uses_queued_resource:
        lines.append("# wait until the describe command above prints ACTIVE")
    lines.append(_show(pack_command(), "copy and install the code on every worker"))
    lines += [_show(c) for c in copy_commands(pod) + install_commands(pod)]
    lines.append(f"# run on all workers of {len(pod.nodes)} node(s) at once (background), stream worker 0")
    lines += [_show(c) + " &" for c in train_commands(pod)]
    lines.append(_show(stream_command(pod)))
    lines.append("# when a node's run fails: stop every worker")
    lines += [_show(c) for c in stop_commands(pod)]
    return lines


def _run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def ensure_slice(pod: Pod) -> None:
    """Creates the slice unless it exists; waits for a queued resource to become ACTIVE."""
    found = subprocess.run(describe_command(pod), capture_output=True, text=True)
    if found.returncode == 0:
        print(f"reusing {pod.name} ({found.stdout.strip()})", flush=True)
    else:
        _run(create_command(pod))
    while pod.uses_queued_resource:
        state = subprocess.run(describe_command(pod), capture_output=True, text=True).stdout.strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"tpu_pod: queued resource {pod.name} is {state}")
        print(f"waiting for {pod.name}: {state or 'unknown'}", flush=True)
        time.sleep(30)


def launch(pod: Pod) -> int:
    """Steps 1-4 of the module docstring; returns the exit status of the run."""
    ensure_slice(pod)
    _run(pack_command())
    for command in copy_commands(pod) + install_commands(pod):
        _run(command)
    runs = [subprocess.Popen(c) for c in train_commands(pod)]
    stream = subprocess.Popen(stream_command(pod))
    status = 0
    try:
        while any(r.poll() is None for r in runs) and not status:
            status = next((r.returncode for r in runs if r.returncode), 0)
            time.sleep(5)
        status = status or next((r.returncode for r in runs if r.returncode), 0)
    finally:
        if status:
            print(
                f"tpu_pod: a node's run failed with status {status}; stopping every worker", file=sys.stderr, flush=True
            )
            for command in stop_commands(pod):
                subprocess.run(command)
        for process in runs + [stream]:
            if process.poll() is None:
                process.terminate()
    return status


def workdir_of(train_args: list[str]) -> str | None:
    """The `--workdir` value of the training arguments (`--workdir DIR` or `--workdir=DIR`)."""
    for i, arg in enumerate(train_args):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(train_args):
            return train_args[i + 1]
    return None


# Chips per TPU VM host, and whether the type's number counts TensorCores (two per chip) or chips.
_HOST_CHIPS = {"v4": 4, "v5p": 4, "v5litepod": 4, "v5e": 4, "v6e": 4}
_COUNTS_CORES = {"v4", "v5p"}
_SINGLE_HOST_CHIPS = {"v5litepod": 8, "v5e": 8, "v6e": 8}  # v5e-8 and v6e-8 are one host of 8 chips


def hosts_per_slice(accelerator: str) -> int:
    """TPU VM hosts of one slice of `accelerator` (v5p-64 -> 8, v5litepod-8 -> 1), per Cloud TPU's
    documented topologies; 1 for a type this table does not know."""
    generation, _, size = accelerator.partition("-")
    if generation not in _HOST_CHIPS or not size.isdigit():
        return 1
    chips = int(size) // (2 if generation in _COUNTS_CORES else 1)
    if chips <= _SINGLE_HOST_CHIPS.get(generation, _HOST_CHIPS[generation]):
        return 1
    return chips // _HOST_CHIPS[generation]


# URL schemes the trainer opens (speechlm_jax.storage.SCHEMES).
_STORE_SCHEMES = ("gs",)


def workdir_problem(workdir: str, hosts: int, shared: bool) -> str | None:
    """Why `workdir` cannot hold the run of `hosts` hosts, or None."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", workdir)
    if match:
        if match.group(1) not in _STORE_SCHEMES:
            return f"--workdir {workdir}: the {match.group(1)}:// scheme is not supported (use gs://bucket/...)"
        return None
    if hosts > 1 and not shared:
        return (
            f"--workdir {workdir} is a local path, but the run has {hosts} hosts: each would write its own copy "
            "on its own disk (lost at preemption) and orbax's multi-host checkpoints need one place every host "
            "shares; use a bucket (--workdir gs://my-bucket/runs/NAME), or pass --shared-workdir if the path is "
            "a filesystem every worker mounts (NFS, Filestore)"
        )
    return None


def parse_args(argv: list[str]) -> tuple[Pod, bool]:
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1 :]
    else:
        train_args = []
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="TPU VM / queued resource name")
    parser.add_argument("--zone", required=True)
    parser.add_argument(
        "--type",
        required=True,
        dest="accelerator",
        help="accelerator type per slice: v4-32, v5p-64, v5litepod-64, v6e-64, ...",
    )
    parser.add_argument(
        "--runtime", default="", help="TPU VM software version (default: the generation's documented one)"
    )
    parser.add_argument("--project", default="")
    parser.add_argument("--slices", type=int, default=1, help="multislice: number of slices (a queued resource)")
    parser.add_argument("--queued", action="store_true", help="use a queued resource even for one slice")
    parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    parser.add_argument(
        "--shared-workdir",
        action="store_true",
        help="the local --workdir is a filesystem every worker mounts (NFS, Filestore); default: a bucket is required",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the exact commands and exit")
    args = parser.parse_args(argv)
    generation = args.accelerator.split("-")[0]
    runtime = args.runtime or RUNTIMES.get(generation, "")
    if not runtime:
        parser.error(f"no default runtime for {args.accelerator!r}; pass --runtime")
    if not train_args:
        parser.error(
            "pass the training arguments after --, e.g. -- --config configs/asr.py:paper --workdir gs://my-bucket/runs/asr"
        )
    workdir = workdir_of(train_args)
    if workdir is None:
        parser.error("the training arguments name no --workdir")
    # Refused here, before any TPU is created.
    if problem := workdir_problem(workdir, hosts_per_slice(args.accelerator) * args.slices, args.shared_workdir):
        parser.error(problem)
    pod = Pod(
        args.name, args.zone, args.accelerator, runtime, args.project, args.slices, args.queued, args.spot, train_args
    )
    return pod, args.dry_run


def main(argv: list[str] | None = None) -> int:
    pod, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    if dry_run:
        print("\n".join(plan(pod)))
        return 0
    return launch(pod)


if __name__ == "__main__":
    sys.exit(main())
