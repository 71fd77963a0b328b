"""Joining a multi-host run: `jax.distributed` set-up, who is primary, what every process sees.

One JAX process runs per host (TPU VM worker, GPU node or Slurm task); together they form
one multi-controller program. Each process must call `jax.distributed.initialize` before it
touches a device, so `speechlm-train` calls `initialize()` first thing. Then:

    every process   builds the same mesh over all devices, reads its own data shard
                    (`data.pipeline`, process_index::process_count), and takes part in
                    every checkpoint save and restore (orbax coordinates the writes)
    process 0       alone writes the resolved config, metrics and exports (`is_primary`)

When to initialise (`mode`):

    "off"   never: one process, the local devices only
    "on"    always: the coordinator comes from the environment (explicit variables below,
            or JAX's own detection of Slurm, Open MPI and Cloud TPU VMs)
    "auto"  (default) only when the environment says this process is one of several:
            the explicit variables, a Slurm job with more than one task, an Open MPI job
            with more than one rank, or a multi-host Cloud TPU slice (GKE/queued
            resources export the worker host names). A plain TPU VM pod slice created
            with gcloud is only detectable through its metadata server, so its launcher
            passes `--distributed` (mode "on").

Explicit variables (what `launch/local.sh` sets; any cluster can use them):
`JAX_COORDINATOR_ADDRESS` (host:port of process 0, read by JAX itself),
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the run: `source` names who said so; None fields are left to JAX's detection."""

    source: str  # "explicit" | "slurm" | "open-mpi" | "cloud-tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1"))
    except ValueError:
        return 1


def detect(env: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The multi-process cluster the environment describes, or None for a single process."""
    env = os.environ if env is None else env
    explicit = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
    if all(env.get(name) for name in explicit):
        return ClusterSpec("explicit", env[COORDINATOR_ENV], int(env[NUM_PROCESSES_ENV]), int(env[PROCESS_ID_ENV]))
    if any(env.get(name) for name in explicit):
        missing = [name for name in explicit if not env.get(name)]
        raise ValueError(f"multi-process run needs all of {', '.join(explicit)}; missing {', '.join(missing)}")
    if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:
        return ClusterSpec("slurm")
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return ClusterSpec("open-mpi")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return ClusterSpec("cloud-tpu")
    return None


def initialize(mode: str = "auto", env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` as `mode` asks (see the module docstring).

    Returns whether this process is part of a distributed run. Calling it again is a
    no-op, so an entry point and a wrapper around it may both call it.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} is not one of {MODES}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off":
        return False
    spec = detect(env)
    if spec is None and mode == "auto":
        return False
    spec = spec or ClusterSpec("jax-detection")
    logging.info(
        "joining a distributed run (%s): coordinator %s", spec.source, spec.coordinator_address or "auto-detected"
    )
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address, num_processes=spec.num_processes, process_id=spec.process_id
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0: the one that writes logs, configs and exports."""
    return jax.process_index() == 0


def describe(mesh: Mesh | None = None) -> dict[str, Any]:
    """What this process sees: its index, the process count, local and global devices, the mesh."""
    local = jax.local_devices()
    info: dict[str, Any] = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": len(local),
        "global_devices": jax.device_count(),
        "platform": local[0].platform,
        "device_kind": local[0].device_kind,
    }
    if mesh is not None:
        info["mesh"] = dict(mesh.shape)
        info["mesh_local_devices"] = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return info


def log_topology(mesh: Mesh | None = None) -> dict[str, Any]:
    """Logs `describe(mesh)` on every process (each host's log names its own index); returns it."""
    info = describe(mesh)
    logging.info(
        "process %d/%d: %d local of %d %s devices (%s)%s",
        info["process_index"],
        info["process_count"],
        info["local_devices"],
        info["global_devices"],
        info["platform"],
        info["device_kind"],
        f"; mesh {info['mesh']} ({info['mesh_local_devices']} here)" if mesh is not None else "",
    )
    return info
