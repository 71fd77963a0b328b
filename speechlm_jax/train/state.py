"""The state of a run, built in one place: the model split into what trains and the frozen base, in their shardings.

`build_state(config, mesh)` is the one recipe for it:

1. the SpeechLM of `config` (`train.build`: pretrained parts read from their HF folders,
   the rest initialised from `config.seed`, every array directly in its sharding; then the
   parts `model.init_from` names taken from an earlier run, `train.init_from`), or with
   `abstract=True` its shapes only (`nnx.eval_shape`: no weight is read or allocated);
2. split into the `trainable` state (the groups of `train.trainable`) and the `frozen` base
   (`train.partitions`), the frozen base cast to `model.frozen_dtype`;
3. the NamedShardings of both (from the config's logical-axis rules) and the optimiser of
   the trainable groups (`train.optimizer`);
4. with `for_training=True`, the state a train step runs on: the batch is checked to divide
   over the mesh's batch shards (`check_batch_shards`), and the optimiser state is made in
   its shardings.

Who builds it: the trainer (`train.trainer`: real, for training), `speechlm-compile`
(`train.compile_aot`: abstract, for training, so a target topology's step is compiled
without allocating a weight), the workdir reader of evaluation, export and selection
(`train.restore`) and the workdir writer of `speechlm-convert import`
(`convert.workdir.write_checkpoint`). Since all of them build it here, the frozen base a
checkpoint's content hash was taken of is bitwise the one every reader rebuilds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from speechlm_jax.sharding import Rules, batch_sharding
from speechlm_jax.train import build, init_from, objectives, optimizer, partitions, step
from speechlm_jax.train import config as config_lib


@dataclasses.dataclass
class TrainState:
    """A run's model as (graphdef, trainable, frozen), their shardings and the optimiser.

    `nnx.merge(graphdef, trainable, frozen)` is the SpeechLM. Real states hold arrays in
    their shardings; abstract ones ShapeDtypeStructs carrying those shardings. `opt_state`
    and `opt_shardings` are those of a state built `for_training`, else None.
    """

    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    trainable_shardings: nnx.State
    frozen_shardings: nnx.State
    tx: optax.GradientTransformation
    schedules: dict[str, optax.Schedule]
    opt_state: Any = None
    opt_shardings: Any = None


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """Into how many pieces the mesh splits the batch axis."""
    spec = batch_sharding(mesh, 1, rules).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def check_batch_shards(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Raises ConfigError unless `train.batch_size` divides over the mesh's batch shards x `train.grad_accum`."""
    shards = batch_shards(mesh, config_lib.sharding_rules(config)) * config.train.grad_accum
    if config.train.batch_size % shards:
        raise config_lib.ConfigError(
            f"train.batch_size={config.train.batch_size} must divide into {shards} (batch shards of mesh "
            f"{dict(mesh.shape)} x train.grad_accum)"
        )


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays (or shapes), each carrying its sharding from `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_state(
    config: ml_collections.ConfigDict, mesh: Mesh, *, abstract: bool = False, for_training: bool = False
) -> TrainState:
    """The TrainState of `config` on `mesh` (see the module docstring).

    `abstract`: shapes, dtypes and shardings only, nothing read or allocated (the
    pretrained parts take their shapes from the config, not from their HF folders).
    `for_training`: checks the batch against the mesh first (ConfigError), and adds the
    optimiser state, in its shardings, made fresh from the trainable state.
    """
    if for_training:
        check_batch_shards(config, mesh)
    rules = config_lib.sharding_rules(config)
    if abstract:
        model = build.abstract_model(config)
    else:
        model = build.build_model(
            config, mesh, rules, compiler_options=step.compiler_options(config.train.fast_compile)
        )
        model = init_from.apply(model, config, mesh)
    graphdef, trainable, frozen = partitions.split_model(model, config_lib.trainable_groups(config))
    del model  # the states hold every array; the module object would pin a second reference
    cast = functools.partial(build.cast_floating, dtype=config.model.frozen_dtype)
    frozen = jax.eval_shape(cast, frozen) if abstract else cast(frozen)
    trainable_sh = partitions.shardings(trainable, mesh, rules)
    frozen_sh = partitions.shardings(frozen, mesh, rules)
    tx, schedules = optimizer.make_optimizer(config)
    opt_state = opt_sh = None
    if for_training:
        opt_state = jax.eval_shape(tx.init, trainable)
        opt_sh = partitions.shardings(opt_state, mesh, rules)
        opt_state = with_shardings(opt_state, opt_sh) if abstract else jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    if abstract:
        trainable, frozen = with_shardings(trainable, trainable_sh), with_shardings(frozen, frozen_sh)
    return TrainState(graphdef, trainable, frozen, trainable_sh, frozen_sh, tx, schedules, opt_state, opt_sh)


def make_train_step(
    state: TrainState,
    config: ml_collections.ConfigDict,
    batch_shardings: Any,
    *,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """The jitted train step of a `for_training` state: the config's objective, gradient
    accumulation and non-finite policy, with the state's shardings and donation (`train.step`)."""
    return step.make_train_step(
        state.graphdef,
        objectives.make_objective(config.loss),
        state.tx,
        state.schedules,
        trainable_shardings=state.trainable_shardings,
        frozen_shardings=state.frozen_shardings,
        opt_shardings=state.opt_shardings,
        batch_shardings=batch_shardings,
        grad_accum=config.train.grad_accum,
        skip_nonfinite=config.train.nonfinite == "skip",
        compiler_options=compiler_options,
    )
