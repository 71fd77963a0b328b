"""LoRA as a parameter partition.

`apply_lora` walks a model and attaches adapters to every `Linear` whose path
(e.g. `llm/layers/3/attn/q_proj`) matches a regular expression. The adapters are
`nnx.LoRAParam`, so the partition that trains is one filter away:

    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)

and the frozen base never gets gradients or optimizer state. `merge_lora` folds the
adapters into the base kernels for export.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
from flax import nnx

from speechlm_jax.models.layers import Linear

# Attention and MLP projections of the decoder LLM (the usual "all linear" LoRA).
LLM_ATTENTION = r"(q_proj|k_proj|v_proj|o_proj)"
LLM_ALL_LINEAR = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (the update is scaled by alpha / r), and a regex searched in module paths."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = rf".*{LLM_ALL_LINEAR}$"


def module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def linear_modules(model: nnx.Module) -> list[tuple[str, Linear]]:
    """Every `Linear` of a model with its path string, in graph order."""
    return [(module_path(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, Linear)]


def apply_lora(
    model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32
) -> list[str]:
    """Adds adapters to every `Linear` whose path matches `config.targets`; returns the paths."""
    pattern = re.compile(config.targets)
    hits = []
    for path, linear in linear_modules(model):
        if pattern.search(path):
            linear.add_lora(config.rank, config.alpha, rngs=rngs, param_dtype=param_dtype)
            hits.append(path)
    if not hits:
        raise ValueError(
            f"LoRA targets {config.targets!r} match no Linear; paths look like "
            f"{[p for p, _ in linear_modules(model)[:4]]}"
        )
    return hits


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter into its kernel; returns how many were merged."""
    merged = 0
    for _, linear in linear_modules(model):
        if linear.has_lora:
            linear.merge_lora()
            merged += 1
    return merged
