"""Starting parts of a run's model from another run's checkpoint (`model.init_from`).

    model.init_from.workdir = "/runs/align"        # an earlier run of the trainer
    model.init_from.parts = "projector,encoder"    # which of its parts to take
    model.init_from.step = 0                       # its checkpoint (0 = the latest)

This is the hand-over between stages: a connector-alignment run (CTC of encoder and projector
through the frozen LLM's head) starts every recipe's projector and encoder; a SALAD stage-1
run starts stage 2. Only what the earlier run trained is in its checkpoint (its `trainable`
item), so a part can be taken only if it trained there; a part it read from an HF folder is
named by that folder instead (`model.encoder_weights`). The part is copied whether it trains
in this run or stays frozen: in the frozen case it becomes part of this run's base, and every
reader of this run (evaluation, export) rebuilds it the same way, through `train.state`.

Shapes must agree tensor by tensor; the first that does not is named with both shapes.
"""

from __future__ import annotations

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from speechlm_jax.models.speechlm import SpeechLM
from speechlm_jax.train import checkpoint
from speechlm_jax.train import config as config_lib

PARTS = ("projector", "encoder")
LORA_LEAVES = ("lora_a", "lora_b")


class InitFromError(ValueError):
    """`model.init_from` names a run, step or part that cannot start this model."""


def parts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The parts `model.init_from` takes (empty when it names no workdir)."""
    if not config.model.init_from.workdir:
        return ()
    names = tuple(p.strip() for p in config.model.init_from.parts.split(",") if p.strip())
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise InitFromError(f"model.init_from.parts={config.model.init_from.parts!r}: name some of {', '.join(PARTS)}")
    return names


def source_trainable(config: ml_collections.ConfigDict, mesh: Mesh) -> nnx.State:
    """The trainable state of `model.init_from`'s run at its step (shardings as this mesh gives them)."""
    from speechlm_jax.train import state as state_lib  # the source's shapes come from its own config

    spec = config.model.init_from
    source_config = config_lib.read_resolved(spec.workdir)
    abstract = state_lib.build_state(source_config, mesh, abstract=True).trainable
    ckpt = checkpoint.Checkpointer(spec.workdir, every=1, keep=source_config.checkpoint.keep, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        step = spec.step or (steps[-1] if steps else None)
        if step is None or step not in steps:
            raise InitFromError(
                f"model.init_from: no checkpoint{'' if not spec.step else f' at step {spec.step}'} in "
                f"{ckpt.directory}; saved steps: {steps}"
            )
        args = ocp.args.Composite(trainable=ocp.args.StandardRestore(checkpoint.abstract_like(abstract)))
        return ckpt.manager.restore(step, args=args).trainable
    finally:
        ckpt.close()


def apply(model: SpeechLM, config: ml_collections.ConfigDict, mesh: Mesh) -> SpeechLM:
    """`model` with the parts `model.init_from` names replaced by the earlier run's trained values."""
    names = parts(config)
    if not names:
        return model
    source = source_trainable(config, mesh)
    run = config.model.init_from.workdir
    for name in names:
        if name not in source:
            raise InitFromError(
                f"model.init_from: the {name} did not train in {run} (its checkpoint holds only what "
                "trained); take it from that run's HF folder instead"
            )
        target = getattr(model, name)
        wanted, taken = nnx.state(target, nnx.Param), source[name]
        want, have = checkpoint.leaf_shapes(wanted), checkpoint.leaf_shapes(taken)
        # This run's own LoRA adapters on the part (e.g. VoiceTextBlender's encoder LoRA) are not
        # in a run that trained the part without them: they keep their fresh start (B = 0, so
        # each adapted layer starts as the base layer taken here).
        missing = sorted(k for k in set(want) - set(have) if k.rsplit("/", 1)[-1] not in LORA_LEAVES)
        extra = sorted(set(have) - set(want))
        if missing or extra:
            hint = ""
            if any(k.startswith("ctc_blank") for k in missing + extra):
                learned = any(k.startswith("ctc_blank") for k in extra)
                hint = f"; set model.projector.ctc_blank={learned} as {run} did"
            raise InitFromError(
                f"model.init_from: {run}'s {name} has other tensors than this model's "
                f"(missing {missing[:3]}, not in this model {extra[:3]}){hint}"
            )
        for key in sorted(have):
            if want[key] != have[key]:
                raise InitFromError(
                    f"model.init_from: {name}/{key} is {have[key]} in {run}, this model's is {want[key]}"
                )
        # Restored in this mesh's shardings already; only the dtype may differ (model.param_dtype).
        values = {checkpoint.leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(taken)[0]}

        def take(path: tuple, own: jax.Array, values: dict = values) -> jax.Array:
            value = values.get(checkpoint.leaf_name(path))
            return own if value is None else value.astype(own.dtype)

        nnx.update(target, jax.tree_util.tree_map_with_path(take, wanted))
    return model
