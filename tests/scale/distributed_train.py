"""`speechlm-train` preceded by `speechlm_jax.distributed.initialize()`: the entry the
multi-process tests launch through `launch/local.sh` (SPEECHLM_TRAIN), so each process joins
the run from the JAX_* variables the launcher sets before the trainer touches a device,
and logs its index and devices (before `main` sets up logging, so the handler is installed
here)."""

from absl import logging

from speechlm_jax import distributed
from speechlm_jax.train import main

if __name__ == "__main__":
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    distributed.initialize()
    distributed.log_topology()
    raise SystemExit(main.main())
