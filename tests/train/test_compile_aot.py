"""`speechlm-compile`: topology names, and the real train step compiled for a TPU slice on this CPU.

The compile test needs libtpu (`pip install -e '.[tpu]'`), which holds XLA's TPU compiler;
without it the test is skipped and says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from speechlm_jax.configs import asr
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import build, compile_aot, metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, chip, grid",
    [
        ("v4-8", "v4", (2, 2, 1)),
        ("v5p-16", "v5p", (2, 2, 2)),
        ("v5p-64", "v5p", (2, 4, 4)),
        ("v5p-128", "v5p", (4, 4, 4)),
        ("v5p-1024", "v5p", (8, 8, 8)),
        ("v5e-4", "v5e", (2, 2)),
        ("v5litepod-32", "v5e", (4, 8)),
        ("v6e-64", "v6e", (8, 8)),
        ("v6e-256", "v6e", (16, 16)),
        ("v5p:4x4x8", "v5p", (4, 4, 8)),
    ],
)
def test_slice_names_give_cloud_tpu_chip_grids(name, chip, grid):
    assert compile_aot.parse_topology(name) == (chip, grid)


@pytest.mark.parametrize(
    "name, message",
    [
        ("h100-8", "--topology local"),
        ("v5p-6", "power-of-two"),
        ("v5p-5", "TensorCores"),
        ("v6e:4x4x4", "2D"),
        ("tpu", "neither"),
    ],
)
def test_bad_topologies_fail_saying_why(name, message):
    with pytest.raises(ValueError, match=message):
        compile_aot.parse_topology(name)


@pytest.mark.parametrize(
    "kind, chip",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("TPU v4", "v4"),
    ],
)
def test_attached_device_kinds_name_their_chip(kind, chip):
    assert compile_aot.chip_of(kind) == compile_aot.CHIPS[chip]


def test_cli_reports_a_bad_topology_without_a_traceback():
    args = [sys.executable, "-m", "speechlm_jax.train.compile_aot", "--config=configs/asr.py:tiny", "--topology=h100-8"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "speechlm-compile: no compile-only topology for 'h100'" in result.stderr and "Traceback" not in result.stderr


def _tiny_config():
    config = asr.get_config("tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 2, 2
    return config


@pytest.fixture(scope="module")
def compiled():
    """The tiny step compiled for a v5e-16 slice by the installed `speechlm-compile --json`
    (one compile serves the command's test and the report's)."""
    if not compile_aot.libtpu_available():
        pytest.skip("libtpu (XLA's TPU compiler) is not installed: pip install -e '.[tpu]'")
    installed = shutil.which("speechlm-compile", path=str(Path(sys.executable).parent))
    command = [installed] if installed else [sys.executable, "-m", "speechlm_jax.train.compile_aot"]
    args = ["--config=configs/asr.py:tiny", "--topology=v5e-16", "--config.mesh.data=-1"]
    args += ["--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--mfu=0.5", "--json"]
    result = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    report = compile_aot.CompileReport(**{k: v for k, v in line.items() if k not in ("peak_bytes", "fits")})
    assert (line["peak_bytes"], line["fits"]) == (report.peak_bytes, report.fits)
    return compile_aot.make_topology("v5e-16"), report


def test_the_report_prints_as_a_table(compiled):
    _, report = compiled
    table = report.table()
    assert "peak / device" in table and "compile time" in table and "(16 devices, mesh" in table


def test_tiny_step_compiles_for_a_multi_host_tpu_slice(compiled):
    topology, report = compiled
    assert len(topology.devices) == 16 and len({d.process_index for d in topology.devices}) == 4
    assert topology.devices[0].device_kind == "TPU v5 lite"
    assert report.mesh == {"data": 4, "fsdp": 2, "tensor": 2}
    assert report.batch["audio"] == [8, 2, 48000] and report.batch["tokens"] == [8, 96]
    assert report.hbm_bytes == 16 * 2**30 and report.fits
    compile_aot.check_fits(report)


def test_memory_covers_every_input_shard(compiled):
    """XLA's argument bytes per device are at least the per-device shards of the step's inputs."""
    topology, report = compiled
    config = _tiny_config()
    mesh = make_mesh(dict(config.mesh), topology.devices)
    _, inputs = compile_aot.train_step_and_inputs(config, mesh, compile_aot.abstract_batch(config))
    shards = [math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(inputs[:4])]
    assert report.argument_bytes >= sum(shards) > 0
    assert report.alias_bytes > 0  # trainable and opt_state are donated into the outputs
    assert (
        report.peak_bytes
        == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes + report.code_bytes
    )


def test_flops_and_step_time(compiled):
    topology, report = compiled
    config = _tiny_config()
    flops = metrics.ModelFlops(
        build.abstract_model(config),
        ("projector", "lora"),
        uses_teacher=False,
        downsample=config.model.projector.downsample,
    )
    expected = flops.breakdown(
        metrics.StepShape(batch=8, audio_slots=2, audio_samples=48000, tokens=96, teacher_tokens=0)
    )["total"]
    assert report.model_flops_per_step == expected
    # XLA counts every FLOP of the partitioned program (log-mel, softmax, ...), the model count only matmuls.
    assert report.xla_flops_per_device * report.devices > expected
    assert report.step_seconds_at_mfu == pytest.approx(expected / (0.5 * 197e12 * 16))


def test_a_step_over_the_hbm_fails_with_the_shortfall(compiled):
    _, report = compiled
    small = dataclasses.replace(report, hbm_bytes=report.peak_bytes - 2**20)
    assert not small.fits
    with pytest.raises(compile_aot.DoesNotFitError, match=r"1\.0 MiB more than"):
        compile_aot.check_fits(small)
