"""Compiles and times the training step of a recipe config; prints one JSON line last.

    python -m benchmarks.train_step --config configs/asr.py:tiny --steps 10
    python -m benchmarks.train_step --config configs/salad.py:paper,llm=qwen2.5-7b --config.train.batch_size=16

(from the repository root; `python benchmarks/train_step.py` works once the package is installed).

The step is the trainer's own (`speechlm_jax.train.step.make_train_step`, same shardings
and donation) on one batch from the config's data pipeline, repeated. Reports compile
time, the median step time, tokens/s, audio seconds/s, the analytic FLOP count per part
(`speechlm_jax.train.metrics.step_flops`) with the MFU it gives, and XLA's own FLOP count of
the compiled step for comparison (XLA counts every op, and remat recomputation).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections

from speechlm_jax import cli
from speechlm_jax.data.preflight import check_sources
from speechlm_jax.sharding import batch_sharding, make_mesh
from speechlm_jax.train import build, data, metrics, objectives, step
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import state as state_lib


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="benchmarks.train_step", description=__doc__.split("\n\n")[0])
    config_lib.add_config_argument(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> None:
        args, config = config_lib.parse_command_line(build_parser(), argv)
        benchmark(config, args.steps)

    return cli.run_command("benchmarks.train_step", body, (config_lib.ConfigError,))


def benchmark(config: ml_collections.ConfigDict, steps: int = 10) -> dict:
    """Times `steps` train steps of `config` after a warm-up one; prints and returns the result."""
    config_lib.validate(config)
    check_sources(config)  # a missing data folder says so, before any model is built
    mesh = make_mesh(dict(config.mesh))
    rules = config_lib.sharding_rules(config)
    groups = config_lib.trainable_groups(config)

    pipeline = data.Data(config)
    host_batch = next(pipeline.train_iterator()[0])
    shardings = {k: batch_sharding(mesh, v.ndim, rules) for k, v in host_batch.items()}
    batch = {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host_batch.items()}

    state = state_lib.build_state(config, mesh, for_training=True)
    trainable, frozen, opt_state = state.trainable, state.frozen, state.opt_state
    train_step = state_lib.make_train_step(
        state, config, shardings, compiler_options=step.compiler_options(config.train.fast_compile)
    )
    del state  # the timed steps rebind trainable and opt_state; `state` would pin the first ones
    rng = jax.random.key(config.seed)

    start = time.perf_counter()
    compiled = train_step.lower(trainable, frozen, opt_state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))

    trainable, opt_state, out = compiled(trainable, frozen, opt_state, batch, rng)
    jax.block_until_ready(out)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        trainable, opt_state, out = compiled(trainable, frozen, opt_state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    flops = metrics.ModelFlops(
        build.abstract_model(config),
        groups,
        uses_teacher=config.loss.name in objectives.USES_TEACHER,
        downsample=config.model.projector.downsample,
    )
    breakdown = flops.breakdown(flops.shape_of(host_batch))
    tokens, audio_seconds = metrics.batch_counts(host_batch)
    devices = list(mesh.devices.flat)
    print("FLOPs per step by part (analytic, matmuls only):")
    for part, value in breakdown.items():
        print(f"  {part:20s} {value:.4e}")
    print(f"  {'xla_cost_analysis':20s} {xla_flops:.4e}")
    result = {
        "config": config.recipe,
        "step_s": step_s,
        "compile_s": compile_s,
        "tokens_per_s": tokens * jax.process_count() / step_s,
        "audio_s_per_s": audio_seconds * jax.process_count() / step_s,
        "flops_per_step": breakdown["total"],
        "xla_flops_per_step": xla_flops,
        "mfu": metrics.mfu(breakdown["total"], step_s, devices),
        "loss": float(out["loss"]),
        "batch_shape": {k: list(v.shape) for k, v in host_batch.items() if k in ("audio", "tokens", "teacher_tokens")},
        "mesh": dict(mesh.shape),
        "device": f"{len(devices)}x {devices[0].device_kind}",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
