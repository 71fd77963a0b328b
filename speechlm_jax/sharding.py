"""Device mesh and logical-axis sharding.

Models name the axes of their parameters and key activations with logical names
(`embed`, `mlp`, `heads`, ...) stored as the `axes` metadata of each `nnx.Variable`.
A rules table (data, usually from the config) maps logical names to the mesh axes
`data`, `fsdp` and `tensor`. Code never names mesh axes directly, so the same model
runs on one CPU, 8 simulated devices, a GPU or a TPU pod.

A dimension whose size does not divide by its mesh axes is replicated instead of
failing: tiny test models then run on any mesh, while real shapes shard as asked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("lora", None),
    ("length", None),
    ("audio_frames", None),
    ("mels", None),
    ("conv_width", None),
    ("norm", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (`data`, `fsdp`, `tensor`) mesh; one size may be -1 (the rest of the devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {axis: 1 for axis in MESH_AXES}
    sizes.update(dict(shape or {"data": -1}))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {len(devices)} available")
    grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def _as_tuple(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_spec(
    axes: Sequence[str | None] | None,
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a dimension that does not divide by the product of its
    mesh axes sizes is left replicated, and a mesh axis is used at most once.
    """
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used) if name else ()
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None and mesh_axes:
                if shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axes a model gave a parameter (`axes` metadata), or None."""
    return variable.get_metadata().get("axes")


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for every array of an `nnx.State` (or any pytree of Variables/arrays)."""

    def one(leaf: Any) -> Any:
        if _is_variable(leaf):
            value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
            spec = logical_to_spec(variable_axes(leaf), rules, np.shape(value), mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places every array of `state` in the sharding its logical axes ask for."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading axis over `batch`, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))
