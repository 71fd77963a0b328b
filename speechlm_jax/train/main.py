"""`speechlm-train`: the command a researcher launches.

    speechlm-train --config configs/salad.py:tiny --config.train.steps=200 --workdir /tmp/run

`--config` is an `ml_collections` config file with a variant after the colon; any key can
be overridden with `--config.<dotted.key>=value`. Before absl parses the flags, every
override key is checked against the config, so a typo fails at once naming the nearest
valid keys over the whole key space (`ml_collections` alone only suggests a sibling).
Restarting with the same `--workdir` resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from speechlm_jax import distributed
from speechlm_jax.train import config as config_lib

_CONFIG = config_lib.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, TensorBoard, resolved config")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "always call jax.distributed.initialize() (multi-host TPU/GPU); without it, multi-host environments are detected")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    # --distributed forces jax.distributed; otherwise Slurm / Open MPI / TPU-pod environments are detected.
    distributed.initialize("on" if _DISTRIBUTED.value else "auto")
    from speechlm_jax.train import trainer

    result = trainer.train(_CONFIG.value, _WORKDIR.value)
    logging.info("finished at step %d (%s)", result.step, result.reason)


def check_command_line(argv: list[str]) -> None:
    """Fails with the nearest valid keys when an override names a key the config lacks."""
    spec = config_lib.config_flag_value(argv)
    keys = config_lib.override_keys(argv)
    if spec is None or not keys:
        return
    config_lib.check_overrides(config_lib.load_config_file(spec), keys)


def main() -> None:
    """Console entry point (`speechlm-train`)."""
    try:
        check_command_line(sys.argv)
    except config_lib.ConfigError as error:
        sys.stderr.write(f"speechlm-train: {error}\n")
        sys.exit(2)
    app.run(_run)


if __name__ == "__main__":
    main()
