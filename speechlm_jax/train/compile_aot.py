"""`speechlm-compile`: will this config fit and how fast will it run, before renting the chips.

    speechlm-compile --config configs/asr.py:paper --config.model.llm=Llama-3.1-8B --topology v5p-64

lowers and compiles the real train step (`train.step.make_train_step`, the one the trainer
runs) for a target topology on this machine, without its accelerators: with libtpu
installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes any TPU
slice as compile-only devices, and XLA's TPU compiler plans the program for them. Nothing
is allocated: the model, optimiser state and batch are abstract (shapes, dtypes and the
shardings the trainer would give them).

It prints, per device, the memory the compiled program needs (arguments, outputs minus the
donated buffers they reuse, temporaries) against the chip's HBM; XLA's FLOPs per device;
the model FLOPs of one step (`train.metrics.step_flops`, what MFU divides by); and the step
time those FLOPs take at a given MFU. It exits 1, saying by how much, when the config does
not fit (or XLA's compiler itself runs out of HBM).

Topologies: `v4-N`, `v5p-N` (N TensorCores, two per chip, as Cloud TPU names them),
`v5e-N` / `v5litepod-N`, `v6e-N` (N chips), or an explicit chip grid such as `v5p:4x4x4`;
`--slices` for multislice. `local` compiles for the attached devices (a GPU node checking a
config before a multi-node launch): JAX has no compile-only GPU topology without the CUDA
plugin and its GPU target description, so GPU clusters use that route.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from speechlm_jax import cli
from speechlm_jax.train import config as config_lib
from speechlm_jax.train.chips import CHIPS, Chip, GiB, chip_of

# Slice-name spellings of chip keys: `v5litepod-32` is a v5e slice.
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


class TopologyUnavailableError(RuntimeError):
    """This machine cannot describe the target: libtpu (the TPU compiler) is not installed."""


def libtpu_available() -> bool:
    """Whether libtpu is installed (`pip install -e '.[tpu]'`): needed for TPU topologies."""
    return importlib.util.find_spec("libtpu") is not None


class DoesNotFitError(RuntimeError):
    """The compiled step needs more memory per device than the chip has."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """Compile-only (or attached) devices of a target, and the chip they are made of."""

    name: str
    chip: Chip
    chips: int
    devices: tuple[jax.Device, ...]

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes * self.chips // len(self.devices)

    @property
    def peak_flops_per_device(self) -> float:
        return self.chip.peak_flops * self.chips / len(self.devices)


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape of `chips` chips: 64 -> (4, 4, 4) in 3D, (8, 8) in 2D."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice has a power-of-two number of chips, not {chips}")
    grid = [1] * dims
    if dims == 3 and chips >= 4:
        grid = [2, 2, 1]  # the smallest 3D slice is a 2x2x1 board
    while math.prod(grid) < chips:
        smallest = min(grid)
        grid[max(i for i, g in enumerate(grid) if g == smallest)] *= 2
    return tuple(grid)


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """`v5p-128` / `v5e-64` / `v5p:4x4x4` -> (chip key, chip grid)."""
    explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name)
    named = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if not explicit and not named:
        raise ValueError(f"topology {name!r} is neither <chip>-<count> (v5p-128, v6e-64) nor <chip>:<grid> (v5p:4x4x4)")
    key = (explicit or named).group(1)
    key = ALIASES.get(key, key)
    if key not in CHIPS or CHIPS[key].platform != "tpu":
        tpus = ", ".join(k for k, c in CHIPS.items() if c.platform == "tpu")
        raise ValueError(
            f"no compile-only topology for {key!r}: TPU chips are {tpus}; GPU clusters use --topology local on one node"
        )
    chip = CHIPS[key]
    if explicit:
        grid = tuple(int(g) for g in explicit.group(2).split("x"))
        if len(grid) != chip.grid_dims:
            raise ValueError(f"{chip.name} slices are {chip.grid_dims}D grids, got {name!r}")
        return key, grid
    count = int(named.group(2))
    if count % chip.name_units_per_chip:
        raise ValueError(f"{name}: {chip.name} slice names count TensorCores, {chip.name_units_per_chip} per chip")
    return key, chip_grid(count // chip.name_units_per_chip, chip.grid_dims)


def tpu_topology(name: str, *, slices: int = 1) -> Topology:
    """Compile-only devices of a TPU slice (needs libtpu; no TPU needed)."""
    from jax.experimental import topologies

    key, grid = parse_topology(name)
    if not libtpu_available():
        raise TopologyUnavailableError(f"compiling for {name} needs libtpu, the TPU compiler: pip install -e '.[tpu]'")
    # libtpu takes a host-wide lock meant for real TPUs; compile-only use may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {"num_slices": slices} if slices > 1 else {}
    if CHIPS[key].name_units_per_chip == 2:
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on real v4/v5p
    desc = topologies.get_topology_desc(f"{key}:{'x'.join(map(str, grid))}", "tpu", **kwargs)
    suffix = f" x {slices} slices" if slices > 1 else ""
    return Topology(f"{name}{suffix}", CHIPS[key], math.prod(grid) * slices, tuple(desc.devices))


def local_topology() -> Topology:
    """The attached devices (one JAX device per chip on GPUs and v4/v5p/v5e/v6e)."""
    devices = tuple(jax.devices())
    return Topology(
        f"local ({len(devices)} x {devices[0].device_kind})", chip_of(devices[0].device_kind), len(devices), devices
    )


def make_topology(name: str, *, slices: int = 1) -> Topology:
    """`local` (attached devices) or a TPU slice name (compile-only devices)."""
    return local_topology() if name == "local" else tpu_topology(name, slices=slices)


@dataclasses.dataclass
class CompileReport:
    """What the compiled step needs per device, and what one step costs."""

    topology: str
    devices: int
    mesh: dict[str, int]
    batch: dict[str, list[int]]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    xla_flops_per_device: float
    model_flops_per_step: float
    mfu: float
    step_seconds_at_mfu: float
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Live memory of the step: inputs, the outputs not written into donated inputs, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), peak_bytes=self.peak_bytes, fits=self.fits)

    def table(self) -> str:
        """The report as aligned `name  value` lines for the console."""
        gib = _size
        rows = [
            ("topology", f"{self.topology} ({self.devices} devices, mesh {self.mesh})"),
            (
                "batch",
                ", ".join(f"{k} {v}" for k, v in self.batch.items() if k in ("audio", "tokens", "teacher_tokens")),
            ),
            ("arguments", gib(self.argument_bytes)),
            ("outputs", f"{gib(self.output_bytes)} ({gib(self.alias_bytes).strip()} of them in donated inputs)"),
            ("temporaries", gib(self.temp_bytes)),
            ("code", gib(self.code_bytes)),
            (
                "peak / device",
                f"{gib(self.peak_bytes)} of {gib(self.hbm_bytes)} HBM ({100 * self.peak_bytes / self.hbm_bytes:.0f}%)",
            ),
            ("XLA FLOPs / device", f"{self.xla_flops_per_device:.3e}"),
            ("model FLOPs / step", f"{self.model_flops_per_step:.3e}"),
            (f"step time @ {self.mfu:.0%} MFU", f"{self.step_seconds_at_mfu:.3f} s"),
            ("compile time", f"{self.compile_seconds:.0f} s"),
        ]
        return "\n".join(f"{k:>20}  {v}" for k, v in rows)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def check_fits(report: CompileReport) -> None:
    """Raises DoesNotFitError, with the shortfall and what to change, when the step exceeds the HBM."""
    if report.fits:
        return
    raise DoesNotFitError(
        f"the step needs {_size(report.peak_bytes)} per device, {_size(report.peak_bytes - report.hbm_bytes)} "
        f"more than the {_size(report.hbm_bytes)} of {report.topology}; try model.remat=full, a larger fsdp axis, "
        "train.grad_accum or a smaller train.batch_size"
    )


def abstract_batch(config: ml_collections.ConfigDict, bucket: int = -1) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one step in bucket `bucket` (default: the largest), as shapes."""
    from speechlm_jax.data import batching

    data = config.data
    empty = batching.collate(
        [],
        tuple(data.buckets[bucket]),
        batch_size=config.train.batch_size,
        max_slots=data.max_slots,
        teacher_tokens=data.teacher_tokens,
        downsample=config.model.projector.downsample,
        pad_id=0,
    )
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in empty.items()}


def train_step_and_inputs(
    config: ml_collections.ConfigDict, mesh: Mesh, batch: dict[str, jax.ShapeDtypeStruct]
) -> tuple[Any, tuple[Any, ...]]:
    """The trainer's jitted step for `mesh` and its abstract inputs, each carrying the trainer's sharding.

    Inputs are (trainable, frozen, opt_state, batch, rng) as ShapeDtypeStructs: the state is
    built abstractly (`train.state.build_state`), so no parameter is ever allocated. Raises
    ConfigError when the batch does not divide over the mesh's batch shards.
    """
    from speechlm_jax.sharding import batch_sharding
    from speechlm_jax.train import state as state_lib

    state = state_lib.build_state(config, mesh, abstract=True, for_training=True)
    batch_sh = {k: batch_sharding(mesh, v.ndim, config_lib.sharding_rules(config)) for k, v in batch.items()}
    train_step = state_lib.make_train_step(state, config, batch_sh)
    rng = jax.ShapeDtypeStruct(
        (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=NamedSharding(mesh, PartitionSpec())
    )
    return train_step, (state.trainable, state.frozen, state.opt_state, state_lib.with_shardings(batch, batch_sh), rng)


def lower_train_step(
    config: ml_collections.ConfigDict, mesh: Mesh, batch: dict[str, jax.ShapeDtypeStruct]
) -> jax.stages.Lowered:
    """The trainer's jitted step lowered for `mesh` on abstract inputs with the trainer's shardings."""
    train_step, inputs = train_step_and_inputs(config, mesh, batch)
    return train_step.lower(*inputs)


def model_flops(config: ml_collections.ConfigDict, batch: dict[str, jax.ShapeDtypeStruct]) -> float:
    """Model FLOPs of one optimiser step on `batch` (the trainer's MFU numerator)."""
    from speechlm_jax.train import build, metrics, objectives

    flops = metrics.ModelFlops(
        build.abstract_model(config),
        config_lib.trainable_groups(config),
        uses_teacher=config.loss.name in objectives.USES_TEACHER,
        downsample=config.model.projector.downsample,
    )
    examples, slots, samples = batch["audio"].shape
    shape = metrics.StepShape(
        batch=examples,
        audio_slots=slots,
        audio_samples=samples,
        tokens=batch["tokens"].shape[1],
        teacher_tokens=batch["teacher_tokens"].shape[1] if flops.uses_teacher else 0,
    )
    return flops.breakdown(shape)["total"]


def compile_train_step(
    config: ml_collections.ConfigDict,
    topology: Topology,
    *,
    mfu: float = 0.4,
    bucket: int = -1,
    hbm_bytes: int | None = None,
) -> CompileReport:
    """Compiles the train step of `config` for `topology` and reads off its memory and FLOPs.

    Raises ConfigError when the batch does not divide over the mesh's batch shards, and
    DoesNotFitError when XLA's compiler itself runs out of device memory; a program that
    compiles but exceeds the HBM comes back as a report with `fits` False (`check_fits`).
    """
    from speechlm_jax.sharding import make_mesh

    config_lib.validate(config)
    mesh = make_mesh(dict(config.mesh), topology.devices)
    hbm = hbm_bytes or topology.hbm_per_device
    batch = abstract_batch(config, bucket)
    start = time.perf_counter()
    try:
        compiled = lower_train_step(config, mesh, batch).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
            raise DoesNotFitError(
                f"XLA cannot fit the step into {hbm / GiB:.2f} GiB per device of {topology.name}: "
                f"{str(error).splitlines()[0]}"
            ) from error
        raise
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = model_flops(config, batch)
    return CompileReport(
        topology=topology.name,
        devices=len(topology.devices),
        mesh=dict(mesh.shape),
        batch={k: list(v.shape) for k, v in batch.items()},
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        hbm_bytes=hbm,
        xla_flops_per_device=float(cost.get("flops", 0.0)),
        model_flops_per_step=total,
        mfu=mfu,
        step_seconds_at_mfu=total / (mfu * topology.peak_flops_per_device * len(topology.devices)),
        compile_seconds=seconds,
    )


PROG = "speechlm-compile"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    config_lib.add_config_argument(p)
    p.add_argument(
        "--topology", required=True, help="v5p-128, v6e-64, v5p:4x4x4, ... or `local` (the attached devices)"
    )
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="number of slices (multislice over DCN; put `data` across them in the mesh)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step-time estimate")
    p.add_argument(
        "--bucket",
        type=int,
        default=-1,
        help="index into data.buckets of the batch shape to compile (default: the largest)",
    )
    p.add_argument(
        "--hbm_gib", type=float, default=0.0, help="memory per device to check against (default: the chip's HBM)"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON line instead of a table")
    cli.add_log_level(p)
    return p


def check_config(
    config: ml_collections.ConfigDict,
    topology_name: str,
    *,
    slices: int = 1,
    mfu: float = 0.4,
    bucket: int = -1,
    hbm_gib: float = 0.0,
    as_json: bool = False,
) -> CompileReport:
    """Compiles `config`'s step for the topology, prints the report; DoesNotFitError when it does not fit."""
    try:
        topology = make_topology(topology_name, slices=slices)
    except (ValueError, TopologyUnavailableError, jax.errors.JaxRuntimeError) as error:
        raise cli.UsageError(str(error)) from error
    report = compile_train_step(config, topology, mfu=mfu, bucket=bucket, hbm_bytes=int(hbm_gib * GiB) or None)
    print(json.dumps(report.as_dict()) if as_json else report.table(), flush=True)
    check_fits(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-compile`): 0 fits, 1 does not fit, 2 a bad flag or config."""

    def body() -> None:
        args, config = config_lib.parse_command_line(build_parser(), argv)
        cli.setup_logging(args.log_level)
        try:
            check_config(
                config,
                args.topology,
                slices=args.slices,
                mfu=args.mfu,
                bucket=args.bucket,
                hbm_gib=args.hbm_gib,
                as_json=args.json,
            )
        except DoesNotFitError as error:
            raise cli.CommandFailed(f"does not fit: {error}") from error

    return cli.run_command(PROG, body, (config_lib.ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
