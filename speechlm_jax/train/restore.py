"""The model of a finished or running training run, for everything downstream of the trainer.

Evaluation (`speechlm-eval`), conversion (`speechlm-convert export`) and SALAD's active
selection all read a workdir the same way, so they share this one reader:

1. `config.json`, the resolved config the trainer wrote;
2. the frozen base rebuilt exactly as the trainer built it (`train.state.build_state`, with the
   run's own compiler options, so randomly initialised parts of tiny runs are bitwise what it
   trained on) and checked against the content hash the checkpoint recorded;
3. only the `trainable` and `meta` items of the step: the optimiser state and the data position
   are the trainer's business. The stored shapes are checked against the config first, since
   orbax would otherwise restore into the config's shapes without complaint.
"""

from __future__ import annotations

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from speechlm_jax import storage
from speechlm_jax.models.speechlm import SpeechLM
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import checkpoint
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import state as state_lib


def read_config(workdir: storage.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir."""
    return config_lib.read_resolved(workdir)


def base_path(config: ml_collections.ConfigDict) -> str:
    """How checkpoints describe the frozen base they were trained on (and its layer form: a
    scanned base has other paths and shapes, so another content hash)."""
    path = f"llm={config.model.llm_weights or 'random'};encoder={config.model.encoder_weights or 'random'}"
    return path + (";model.scan_layers=true" if config.model.scan_layers else "")


def load_model(
    workdir: storage.PathLike, *, mesh: Mesh | None = None, step: int | None = None
) -> tuple[SpeechLM, ml_collections.ConfigDict, int]:
    """The SpeechLM of a run at `step` (default: the latest checkpoint), sharded on `mesh`.

    Returns (model, config, step). Raises FileNotFoundError without such a checkpoint,
    `checkpoint.CheckpointMismatchError` (a ValueError) when its tensors do not fit the config,
    and `checkpoint.BaseMismatchError` when the base weights the config names are not those the
    checkpoint was trained on.
    """
    workdir = storage.path(workdir)
    config = read_config(workdir)
    mesh = mesh if mesh is not None else make_mesh({"data": 1}, jax.devices()[:1])
    state = state_lib.build_state(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=config.checkpoint.keep, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}; saved steps: {steps}"
            )
        checkpoint.check_fits(
            ckpt.directory / str(step) / "trainable", state.trainable, context="the workdir's config.json"
        )
        args = ocp.args.Composite(
            trainable=ocp.args.StandardRestore(checkpoint.abstract_like(state.trainable)), meta=ocp.args.JsonRestore()
        )
        restored = ckpt.manager.restore(step, args=args)
    finally:
        ckpt.close()
    checkpoint.check_base(dict(restored.meta), checkpoint.base_hash(state.frozen), base_path(config))
    return nnx.merge(state.graphdef, restored.trainable, state.frozen), config, step
