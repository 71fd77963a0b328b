"""When a process joins a distributed run, and what it reports about itself."""

from __future__ import annotations

import jax
import pytest

from speechlm_jax import distributed
from speechlm_jax.sharding import make_mesh


def test_explicit_variables_describe_the_cluster():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.detect(env) == distributed.ClusterSpec("explicit", "10.0.0.1:1234", 4, 3)


def test_partial_explicit_variables_fail_naming_the_missing_ones():
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


@pytest.mark.parametrize(
    "env, source",
    [
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "open-mpi"),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "cloud-tpu"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "t1:8080"}, "cloud-tpu"),
    ],
)
def test_cluster_environments_leave_the_details_to_jax(env, source):
    spec = distributed.detect(env)
    assert spec == distributed.ClusterSpec(source)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},
        {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"},
        {"TPU_WORKER_HOSTNAMES": "t1"},
    ],
)
def test_single_process_environments_stay_single(env):
    assert distributed.detect(env) is None
    assert distributed.initialize("auto", env) is False


def test_off_never_initialises_and_bad_modes_fail():
    assert distributed.initialize("off", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is False
    with pytest.raises(ValueError, match="auto"):
        distributed.initialize("sometimes")


def test_describe_names_process_devices_and_mesh():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    info = distributed.log_topology(mesh)
    assert info == {
        "process_index": 0,
        "process_count": 1,
        "local_devices": 8,
        "global_devices": 8,
        "platform": "cpu",
        "device_kind": jax.devices()[0].device_kind,
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "mesh_local_devices": 8,
    }
    assert distributed.is_primary()
