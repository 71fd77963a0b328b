"""`speechlm-train`: the command a researcher launches.

    speechlm-train --config configs/salad.py:tiny --config.train.steps=200 --workdir /tmp/run

`--config` is an `ml_collections` config file with a variant after the colon; any key can
be overridden with `--config.<dotted.key>=value` (parsed against the field's type by
`train.config.parse_command_line`). Every override key is checked against the config before
anything is built, so a typo fails at once naming the nearest valid keys over the whole key
space. Restarting with the same `--workdir` resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from speechlm_jax import cli, distributed
from speechlm_jax.train import config as config_lib

PROG = "speechlm-train"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    config_lib.add_config_argument(p)
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, TensorBoard, resolved config")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="always call jax.distributed.initialize() (multi-host TPU/GPU); "
        "without it, multi-host environments are detected",
    )
    cli.add_log_level(p)
    return p


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, distributed_init: bool = False) -> Any:
    """Joins a distributed run when there is one, trains `config` in `workdir`; returns the trainer's result."""
    # --distributed forces jax.distributed; otherwise Slurm / Open MPI / TPU-pod environments are detected.
    distributed.initialize("on" if distributed_init else "auto")
    from speechlm_jax.train import trainer

    result = trainer.train(config, workdir)
    logging.getLogger(__name__).info("finished at step %d (%s)", result.step, result.reason)
    return result


def check_command_line(argv: Sequence[str]) -> None:
    """Fails with the nearest valid keys when an override names a key the config lacks."""
    spec = config_lib.config_flag_value(argv)
    keys = config_lib.override_keys(argv)
    if spec is None or not keys:
        return
    config_lib.check_overrides(config_lib.load_config_file(spec), keys)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-train`); returns the exit status."""

    def body() -> None:
        args, config = config_lib.parse_command_line(build_parser(), argv)
        cli.setup_logging(args.log_level)
        train(config, args.workdir, distributed_init=args.distributed)

    from speechlm_jax.train import checkpoint, init_from

    user_errors = (
        config_lib.ConfigError,
        checkpoint.CheckpointMismatchError,
        checkpoint.BaseMismatchError,
        init_from.InitFromError,
    )
    return cli.run_command(PROG, body, user_errors)


if __name__ == "__main__":
    sys.exit(main())
