"""Which parameters train, in which optimiser group, and which get weight decay.

The model splits into a trainable and a frozen state (`nnx.split`); only the trainable
state gets gradients, optimiser state and checkpoints. Every trainable parameter belongs
to one group, named after the part of the SpeechLM it lives in:

    lora       any `nnx.LoRAParam` (LLM adapters, and encoder adapters when configured)
    projector  parameters under `projector/`
    encoder    non-LoRA parameters under `encoder/` (full encoder fine-tuning)
    llm        non-LoRA parameters under `llm/` (full LLM fine-tuning)

Groups carry their own learning-rate schedule (SALAD: projector 1e-3, LLM 5e-5). Buffers
(Whisper's sinusoidal positions) are not `nnx.Param` and never train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from speechlm_jax.models.speechlm import trainable_filter as speechlm_trainable_filter
from speechlm_jax.sharding import Rules, logical_to_spec, variable_axes

GROUPS = ("projector", "lora", "encoder", "llm")

Path = tuple[Any, ...]


def _names(path: Path) -> tuple[str, ...]:
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        names.append(str(name))
    return tuple(names)


def param_group(path: Path, variable: Any) -> str | None:
    """The optimiser group of a parameter from its module path, or None for non-parameters."""
    if isinstance(variable, nnx.LoRAParam):
        return "lora"
    if not isinstance(variable, nnx.Param):
        return None
    top = _names(path)[0]
    return top if top in ("projector", "encoder", "llm") else None


def trainable_filter(groups: Sequence[str]) -> nnx.filterlib.Filter:
    """The nnx filter selecting the trainable parameters of `groups` (the model's own helper).

    The "lora" group trains every adapter the model has: the LLM's and, when configured,
    the encoder's.
    """
    kinds = [g for g in groups if g != "lora"] + (["lora", "encoder_lora"] if "lora" in groups else [])
    return speechlm_trainable_filter(kinds)


def split_model(model: nnx.Module, groups: Sequence[str]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """model -> (graphdef, trainable state, frozen state); merge with `nnx.merge(graphdef, trainable, frozen)`."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(groups), ...)
    stray = {param_group(p, v) for p, v in _variables(trainable)} - set(groups)
    if stray:
        raise ValueError(f"trainable filter selected parameters of groups {sorted(stray)} not in {list(groups)}")
    return graphdef, trainable, frozen


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _variables(state: Any) -> list[tuple[Path, nnx.Variable]]:
    return jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]


def map_variables(fn: Callable[[Path, nnx.Variable], Any], state: Any) -> Any:
    """A tree of `state`'s structure whose Variables hold fn(path, variable) (labels, masks)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v.replace(fn(p, v)) if _is_variable(v) else fn(p, v), state, is_leaf=_is_variable
    )


def group_labels(state: Any) -> Any:
    """`state` with every Variable replaced by its group name (optax.multi_transform labels)."""
    return map_variables(lambda p, v: param_group(p, v), state)


def decays(path: Path, variable: Any) -> bool:
    """Weight decay applies to matrices (kernels, embeddings, adapters), not to norms or biases."""
    value = variable.get_value() if _is_variable(variable) else variable
    names = _names(path)
    return len(getattr(value, "shape", ())) >= 2 and not any("norm" in n or n == "bias" for n in names)


def decay_mask(state: Any) -> Any:
    """`state` with every Variable replaced by whether it decays."""
    return map_variables(decays, state)


def count_params(state: Any) -> dict[str, int]:
    """Number of parameters per group (plus "total") of a trainable or frozen state."""
    counts: dict[str, int] = {"total": 0}
    for path, variable in _variables(state):
        group = param_group(path, variable) or "other"
        size = int(variable.get_value().size)
        counts[group] = counts.get(group, 0) + size
        counts["total"] += size
    return counts


def shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a trainable/frozen state or an optimiser state built from one.

    Like `sharding.state_shardings`, and also for optimiser states: their moments are
    Variables with the parameters' axes, and groups masked out of a `multi_transform`
    hold an empty `MaskedNode` (no array to place).
    """

    def one(leaf: Any) -> Any:
        if _is_variable(leaf):
            value = leaf.get_value()
            if not hasattr(value, "shape"):
                return leaf
            return leaf.replace(NamedSharding(mesh, logical_to_spec(variable_axes(leaf), rules, value.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_variable)
