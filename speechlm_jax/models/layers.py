"""Building blocks shared by every model family: Linear (LoRA-capable), Embed, norms.

Every parameter carries its logical axes as `axes` metadata (see `sharding.py`).
Parameters are stored in `param_dtype` (fp32 for trainables) and cast to the
compute `dtype` (bf16 on accelerators) inside the matmul; norms and softmax run in
float32 whatever the compute dtype.

LoRA lives inside `Linear`: `add_lora` attaches `lora_a` [in, rank] and `lora_b`
[rank, out] as `nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` separates
the adapter from the frozen base. `__call__(x, lora=False)` skips the adapter
without touching any weight: that pass is the teacher.

Attention implementations (`ATTENTION`, the `attention` field of the LLM and encoder
configs): "einsum" forms every score [batch, heads, T, S] explicitly; it is the reference,
and the only one for what the fused kernels cannot express (the LLM's attention
soft-capping). "dot_product" calls `jax.nn.dot_product_attention` and lets JAX choose the
kernel (on jax 0.10 that is always XLA's, the einsum computation in one op); "cudnn" asks
for cuDNN's fused flash attention (NVIDIA GPUs only: the scores stay in on-chip memory).

Scanned layers (`scan_layers` of the LLM and encoder configs): `stack_layers` makes a stack
of identical layers one module whose every parameter has a leading `layers` axis (layer i's
values at index i), and `scan` runs it with `jax.lax.scan`, so XLA traces and compiles one
layer whatever the depth (MaxText's scan_layers). Inside the scan body the module is
rebuilt from one layer's slice of the state (`nnx.merge`), so a layer's code is the same
in both forms; LoRA adapters added to a stacked `Linear` are stacked too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

default_init: Initializer = nnx.initializers.normal(0.02)

# The logical axis of the stacked layers of a scanned model (replicated: every device holds all layers).
LAYERS_AXIS = "layers"

# `attention` config value -> `jax.nn.dot_product_attention(implementation=...)`; einsum is our own.
ATTENTION = {"einsum": None, "dot_product": None, "cudnn": "cudnn"}


def check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTION)}")


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    attention: str,
    scale: float,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    local_window_size: tuple[int, int] | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` on q [B, T, heads, D], k/v [B, S, kv_heads, D] -> [B, T, heads, D].

    `mask` is boolean (True = may attend), broadcastable to [B, heads, T, S]. q, k and v
    are given in one dtype (the kernel requires it); softmax runs in float32 inside.
    """
    return jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        implementation=ATTENTION[attention],
    )


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ scale * x @ lora_a @ lora_b); kernel is [in, out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = default_init,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.axes = tuple(axes)
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype), axes=self.axes)
        self.bias = nnx.data(
            nnx.Param(jnp.zeros((out_features,), param_dtype), axes=self.axes[1:]) if use_bias else None
        )
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0

    def add_lora(self, rank: int, alpha: float, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32) -> None:
        """Attaches a rank-`rank` adapter scaled by alpha / rank; B starts at zero (output unchanged)."""
        # A stacked Linear (scanned layers) gets one adapter per layer, stacked the same way.
        lead = tuple(self.kernel[...].shape[:-2])
        lead_axes = (LAYERS_AXIS,) * len(lead)
        init = nnx.initializers.he_uniform(batch_axis=tuple(range(len(lead))))
        self.lora_a = nnx.LoRAParam(
            init(rngs.params(), (*lead, self.in_features, rank), param_dtype), axes=(*lead_axes, self.axes[0], "lora")
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, rank, self.out_features), param_dtype), axes=(*lead_axes, "lora", self.axes[1])
        )
        self.lora_scale = float(alpha) / rank

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def merge_lora(self) -> None:
        """Folds the adapter into the kernel and removes it (for export)."""
        if not self.has_lora:
            return
        delta = (self.lora_a[...] @ self.lora_b[...]) * self.lora_scale
        self.kernel[...] = (self.kernel[...] + delta).astype(self.kernel[...].dtype)
        self.lora_a = None
        self.lora_b = None
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array, lora: bool = True) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if lora and self.has_lora:
            update = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
            y = y + update * jnp.asarray(self.lora_scale, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def stack_layers(make: Callable[[], nnx.Module], count: int) -> nnx.Module:
    """`count` modules from `make()`, made in order (the random draws of an unrolled stack), as one
    module whose every Variable holds their values stacked on a leading axis (logical axis `layers`)."""
    layers = [make() for _ in range(count)]
    flats = [dict(nnx.to_flat_state(nnx.state(layer))) for layer in layers]
    stacked = layers[0]
    for path, _ in nnx.to_flat_state(nnx.state(stacked)):
        target = _variable_at(stacked, path)
        target.set_value(jnp.stack([flat[path].get_value() for flat in flats]))
        axes = target.get_metadata().get("axes")
        if axes is not None:
            target.set_metadata(axes=(LAYERS_AXIS, *axes))
    return stacked


def _variable_at(module: nnx.Module, path: tuple) -> nnx.Variable:
    node: Any = module
    for name in path:
        node = node[name] if isinstance(name, int) else getattr(node, name)
    return node


def scan(
    layers: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat: bool = False,
    policy: Any = None,
) -> tuple[Any, Any]:
    """`jax.lax.scan` over a stacked module: body(layer i, carry, xs[i]) -> (carry, ys[i]).

    With `remat` each layer is checkpointed (`jax.checkpoint` with `policy`, None = save
    nothing) and recomputed in the backward pass.
    The module is split into its state here and merged per layer in the body, as a pure function.
    """
    graphdef, state = nnx.split(layers)

    def step(carry: Any, inputs: tuple[nnx.State, Any]) -> tuple[Any, Any]:
        layer_state, layer_xs = inputs
        return body(nnx.merge(graphdef, layer_state), carry, layer_xs)

    if remat:
        step = jax.checkpoint(step, policy=policy)
    return jax.lax.scan(step, carry, (state, xs))


class Embed(nnx.Module):
    """Token embedding [vocab, embed]; `attend` is the tied unembedding."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = nnx.Param(
            default_init(rngs.params(), (num_embeddings, features), param_dtype), axes=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class RMSNorm(nnx.Module):
    """RMSNorm in float32. `zero_centered` stores w - 1 (Gemma's `(1 + w)` convention)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        zero_centered: bool = False,
        axes: Axes = ("norm",),
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.zero_centered = zero_centered
        init = jnp.zeros if zero_centered else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.zero_centered:
            scale = 1.0 + scale
        return (x * scale).astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axes: Axes = ("norm",), param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)
