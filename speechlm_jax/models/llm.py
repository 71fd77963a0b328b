"""The decoder LLM: one implementation for Llama 3.x, Qwen2/2.5, Qwen3 and Gemma 3 text.

The family differences are all config switches read from the HF config
(`LLMConfig.from_hf`): q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3),
Gemma's zero-centered norms, sandwich (pre + post) norms, sqrt(d) embedding scale,
`query_pre_attn_scalar`, sliding-window layers with their own RoPE base, tanh
soft-capping of attention scores and final logits, llama3/linear RoPE scaling, and
tied or untied unembedding.

In the speech LLM this model is the text backbone: `embed` turns token ids into
embeddings (the audio embeddings are scattered into them afterwards),
`hidden_states` runs the layers, and the losses either take `logits` or work in
chunks from the hidden states and `unembedding()`. The same weights serve as the
teacher with `lora=False`.

Attention masks are built from slot indices (causal, sliding window) and the
`input_mask` (padding), as transformers does; a `KVCache` holds keys and values of a
fixed length so that decoding (`speechlm_jax.generate`) updates it in place.

`attention` picks how a layer attends (`layers.ATTENTION`): the einsum reference builds
the dense [B, T, S] mask and every score; the fused forms pass `jax.nn.dot_product_attention`
the causal mask as `is_causal`, the sliding window as `local_window_size` and padding as a
[B, 1, 1, S] key mask, so a kernel that has them never forms a [T, S] tensor (with a KV
cache, whose queries sit at `cache.index`, the dense mask is passed instead). Soft-capped
attention scores (`attn_logit_softcapping`) exist only in the einsum form; a config that
asks for both is refused.

`scan_layers` stores the layers as one `DecoderLayer` whose parameters are stacked on a
leading `layers` axis (`layers.stack_layers`; module paths `layers/attn/q_proj`, ...) and
runs them with one `jax.lax.scan`, so compile time does not grow with depth; remat applies
per layer inside the scan body, and the KV cache is then one [layers, batch, ...] array of
keys and one of values, scanned alongside. The layers must all be of one type: Gemma 3's
alternating sliding and full layers (a different mask and RoPE per layer) are refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speechlm_jax.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    check_attention,
    fused_attention,
    scan,
    stack_layers,
)

# Fields of ours that no HF config carries: how the model runs, not what it is.
OWN_FIELDS = ("remat", "attention", "scan_layers")

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Architectures written into `to_hf()` so that transformers' Auto classes rebuild the model.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: base `theta` and the scaling `kind` (default, linear, llama3)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: Mapping[str, Any], max_position_embeddings: int) -> RopeConfig:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"RoPE type {kind!r} is not supported (default, linear, llama3)")
        theta = float(params["rope_theta"])
        if kind == "default":
            return cls(theta=theta)
        if kind == "linear":
            return cls(theta=theta, kind=kind, factor=float(params["factor"]))
        return cls(
            theta=theta,
            kind=kind,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", max_position_embeddings)
            ),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.kind, "rope_theta": self.theta}
        if self.kind in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.kind == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """[head_dim // 2] inverse frequencies, float32, with transformers' formulas and precision."""
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / np.power(np.float32(self.theta), exponents)).astype(np.float32)
        if self.kind == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.kind == "llama3":
            old_context = self.original_max_position_embeddings
            low_freq_wavelen = old_context / self.low_freq_factor
            high_freq_wavelen = old_context / self.high_freq_factor
            wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(self.factor), inv_freq).astype(
                np.float32
            )
            smooth = (old_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smooth = smooth.astype(np.float32)
            smoothed = ((1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled).astype(np.float32)
            medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv_freq


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _eos_hf(eos: tuple[int, ...]) -> int | list[int] | None:
    if not eos:
        return None
    return eos[0] if len(eos) == 1 else list(eos)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Shapes and switches of a decoder LLM; `from_hf` reads any supported HF config."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    zero_centered_norm: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    remat: str = "none"
    attention: str = "einsum"
    scan_layers: bool = False

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; one of {sorted(ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} heads do not group into {self.num_key_value_heads} kv heads")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of none, {', '.join(REMAT_POLICIES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        check_attention(self.attention)
        if self.scan_layers and len(set(self.layer_types)) > 1:
            raise ValueError(
                f"scanned layers must all be of one type, but layer_types mixes {sorted(set(self.layer_types))} "
                "(a different mask and RoPE per layer); set model.scan_layers=false"
            )
        if self.attention != "einsum" and self.attn_logit_softcapping is not None:
            raise ValueError(
                f"attention={self.attention!r} cannot soft-cap attention scores (attn_logit_softcapping="
                f"{self.attn_logit_softcapping}); use attention='einsum' (model.attention=einsum)"
            )

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL_ATTENTION

    def rope_for(self, layer_type: str) -> RopeConfig:
        if layer_type == SLIDING_ATTENTION and self.local_rope is not None:
            return self.local_rope
        return self.rope

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any, **overrides: Any) -> LLMConfig:
        """Reads a transformers config (object or config.json dict); `overrides` set our own fields (e.g. remat)."""
        cfg = dict(hf if isinstance(hf, Mapping) else hf.to_dict())
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            text = cfg["text_config"]
            cfg = dict(text if isinstance(text, Mapping) else text.to_dict())
            cfg["model_type"] = "gemma3_text"
            # Gemma3ForConditionalGeneration applies no final soft-capping (its text configs set none).
            cfg["final_logit_softcapping"] = None
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not supported; one of {sorted(ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        max_pos = cfg.get("max_position_embeddings", 2048)
        gemma = model_type == "gemma3_text"
        if gemma and cfg.get("use_bidirectional_attention"):
            raise ValueError("Gemma 3 with use_bidirectional_attention is an encoder, not a decoder LLM")
        rope, local_rope = _rope_from_hf(cfg, gemma, max_pos)
        sliding_window, layer_types = _layer_types_from_hf(cfg, model_type, layers)
        attention_bias = bool(cfg.get("attention_bias", False))
        fields = dict(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            hidden_act=(cfg.get("hidden_activation") if gemma else None) or cfg.get("hidden_act", "silu"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sandwich_norm=gemma,
            zero_centered_norm=gemma,
            scale_embeddings=gemma,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)) if gemma else None,
            rope=rope,
            local_rope=local_rope,
            layer_types=layer_types,
            sliding_window=sliding_window,
            # transformers' Gemma 3 attention never applies attn_logit_softcapping (published
            # configs set it to null), so neither do we when reading a Gemma 3 config.
            attn_logit_softcapping=None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=_eos_tuple(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict (transformers' current format) that `AutoConfig.for_model(**d)` rebuilds."""
        gemma = self.model_type == "gemma3_text"
        out: dict[str, Any] = dict(
            model_type=self.model_type,
            architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=_eos_hf(self.eos_token_id),
            pad_token_id=self.pad_token_id,
        )
        if gemma:
            out.update(
                hidden_activation=self.hidden_act,
                attention_bias=self.qkv_bias,
                # transformers' strict config wants an int here (published configs store 256).
                query_pre_attn_scalar=int(self.query_pre_attn_scalar)
                if float(self.query_pre_attn_scalar).is_integer()
                else self.query_pre_attn_scalar,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types),
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
                rope_parameters={
                    FULL_ATTENTION: self.rope.to_hf(),
                    SLIDING_ATTENTION: (self.local_rope or self.rope).to_hf(),
                },
            )
            return out
        out.update(hidden_act=self.hidden_act, rope_parameters=self.rope.to_hf())
        if self.model_type == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        else:
            sliding = self.sliding_window is not None
            out.update(
                use_sliding_window=sliding,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types) if self.layer_types else [FULL_ATTENTION] * self.num_hidden_layers,
            )
            if self.model_type == "qwen3":
                out["attention_bias"] = self.qkv_bias
        return out


def _rope_from_hf(cfg: Mapping[str, Any], gemma: bool, max_pos: int) -> tuple[RopeConfig, RopeConfig | None]:
    """Global and (Gemma) local RoPE from either `rope_parameters` or the older rope_theta/rope_scaling keys."""
    params = cfg.get("rope_parameters") or {}
    if FULL_ATTENTION in params or SLIDING_ATTENTION in params:
        full = RopeConfig.from_hf(params[FULL_ATTENTION], max_pos)
        local = RopeConfig.from_hf(params[SLIDING_ATTENTION], max_pos) if SLIDING_ATTENTION in params else None
        return full, local
    params = dict(params)
    params.update(cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0 if gemma else 10_000.0))
    full = RopeConfig.from_hf(params, max_pos)
    local = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10_000.0))) if gemma else None
    return full, local


def _layer_types_from_hf(cfg: Mapping[str, Any], model_type: str, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) following each family's config defaults."""
    if model_type == "llama":
        return None, ()
    if model_type == "gemma3_text":
        window = cfg.get("sliding_window", 4096)
        types = cfg.get("layer_types")
        if not types:
            pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
            types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)]
        return window, tuple(types)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    types = cfg.get("layer_types")
    if not types:
        max_window_layers = cfg.get("max_window_layers", layers)
        types = [
            SLIDING_ATTENTION if window is not None and i >= max_window_layers else FULL_ATTENTION
            for i in range(layers)
        ]
    if SLIDING_ATTENTION not in types:
        return None, ()
    return window, tuple(types)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer, [batch, max_length, kv_heads, head_dim] each, written at `index`.

    With scanned layers `keys` and `values` are each one array [layers, batch, max_length,
    kv_heads, head_dim] instead of a tuple.

    `mask` [batch, max_length] marks the slots holding real tokens (prompt padding stays 0);
    `index` (int32 scalar) is the next slot to write, shared by the batch (prompts are left-padded).
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see: causal, padding (`key_mask` [B, S]) and an optional window.

    `q_slots` [T] are the queries' slots among the S keys; `aligned` (static) says they are
    0..T-1 of T = S keys (no cache), the case the fused kernels' `is_causal` describes.
    A query at slot q sees key slot s when key_mask[s], s <= q and s > q - window.
    """

    key_mask: jax.Array
    q_slots: jax.Array
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    aligned: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """[B, T, S] bool (True = may attend)."""
        kv_slots = jnp.arange(self.key_mask.shape[1])[None, None, :]
        q_slots = self.q_slots[None, :, None]
        allowed = self.key_mask[:, None, :] & (kv_slots <= q_slots)
        if self.window is not None:
            allowed = allowed & (kv_slots > q_slots - self.window)
        return allowed


def default_positions(input_mask: jax.Array) -> jax.Array:
    """Positions [batch, length] counting only real tokens (left or right padding), 0 on padding."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)


def rope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, length, head_dim] in float32 for integer `positions` [batch, length]."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope.inv_freq(head_dim))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] (rotate-half convention) in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k norms, soft-capping and a KV cache."""

    def __init__(self, config: LLMConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.attention = config.attention
        self.dtype = dtype
        d, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, q_dim, axes=("embed", "heads"), use_bias=config.qkv_bias, **linear)
        self.k_proj = Linear(d, kv_dim, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **linear)
        self.v_proj = Linear(d, kv_dim, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **linear)
        self.o_proj = Linear(q_dim, d, axes=("heads", "embed"), use_bias=config.o_bias, **linear)
        norm = dict(eps=config.rms_norm_eps, zero_centered=config.zero_centered_norm, param_dtype=param_dtype)
        self.q_norm = nnx.data(RMSNorm(self.head_dim, **norm) if config.qk_norm else None)
        self.k_norm = nnx.data(RMSNorm(self.head_dim, **norm) if config.qk_norm else None)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: AttentionMask,
        cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        *,
        lora: bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D], cos/sin [B, T, head_dim], mask over the T queries and S keys.

        `cache` is (keys, values [B, S, kv_heads, head_dim], index): the new keys and values
        are written at slot `index` and attention runs over all S slots.
        Returns ([B, T, D], updated (keys, values) or None).
        """
        b, t, _ = x.shape
        q = self.q_proj(x, lora).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, lora).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, lora).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            cached_k, cached_v, index = cache
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, index, 0, 0))
            new_cache = (k, v)
        if self.attention != "einsum":
            out = self._fused(q, k, v, mask)
            return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), lora), new_cache
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(self.dtype), preferred_element_type=jnp.float32)
        scores = scores * self.scale
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask.dense()[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), lora), new_cache

    def _fused(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
        """`jax.nn.dot_product_attention` with the mask in the kernel's own terms -> [B, T, heads, head_dim]."""
        q = q.astype(self.dtype)
        if not mask.aligned:
            return fused_attention(q, k, v, attention=self.attention, scale=self.scale, mask=mask.dense()[:, None])
        window = None if mask.window is None else (mask.window - 1, 0)
        return fused_attention(
            q,
            k,
            v,
            attention=self.attention,
            scale=self.scale,
            mask=mask.key_mask[:, None, None, :],
            is_causal=True,
            local_window_size=window,
        )


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        linear = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **linear)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **linear)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **linear)
        self.activation = config.hidden_act

    def __call__(self, x: jax.Array, *, lora: bool = True) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        return self.down_proj(act(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; Gemma adds a norm after each block (sandwich)."""

    def __init__(self, config: LLMConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, zero_centered=config.zero_centered_norm, param_dtype=param_dtype)
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, **norm)
        self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(d, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = nnx.data(RMSNorm(d, **norm) if config.sandwich_norm else None)
        self.post_mlp_norm = nnx.data(RMSNorm(d, **norm) if config.sandwich_norm else None)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: AttentionMask,
        cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        *,
        lora: bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        h, new_cache = self.attn(self.attn_norm(x), cos, sin, mask, cache, lora=lora)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x), lora=lora)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, new_cache


class DecoderLLM(nnx.Module):
    """Decoder-only LLM (module paths `embed_tokens`, `layers/<i>/attn/q_proj`, ..., `norm`, `lm_head`)."""

    def __init__(
        self,
        config: LLMConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = config.hidden_size
        self.embed_tokens = Embed(config.vocab_size, d, **kw)
        if config.scan_layers:
            self.layers = stack_layers(lambda: DecoderLayer(config, **kw), config.num_hidden_layers)
        else:
            self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(
            d, eps=config.rms_norm_eps, zero_centered=config.zero_centered_norm, param_dtype=param_dtype
        )
        lm_head = None if config.tie_word_embeddings else Linear(d, config.vocab_size, axes=("embed", "vocab"), **kw)
        self.lm_head = nnx.data(lm_head)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D]; Gemma's sqrt(D) scale is applied in the embedding dtype, as HF does."""
        table = self.embed_tokens.embedding[...]
        x = jnp.take(table, tokens, axis=0)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(self.config.hidden_size**0.5, table.dtype)
        return x.astype(self.dtype)

    def init_cache(self, batch: int, max_length: int, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_length` tokens (prompt + generated)."""
        c = self.config
        shape = (batch, max_length, c.num_key_value_heads, c.head_dim)
        dtype = dtype or self.dtype
        if c.scan_layers:
            stacked = (c.num_hidden_layers, *shape)
            return KVCache(
                keys=jnp.zeros(stacked, dtype),
                values=jnp.zeros(stacked, dtype),
                mask=jnp.zeros((batch, max_length), jnp.int32),
                index=jnp.zeros((), jnp.int32),
            )
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers)),
            mask=jnp.zeros((batch, max_length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def hidden_states(
        self,
        inputs_embeds: jax.Array,
        *,
        positions: jax.Array,
        input_mask: jax.Array,
        lora: bool = True,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the layers on inputs_embeds [B, T, D] -> (final-normed hidden [B, T, D], new cache or None).

        positions [B, T] drive RoPE; input_mask [B, T] (1 = real) masks padded keys. With a
        cache the T inputs are appended at `cache.index` and attend to all cached slots.
        """
        c = self.config
        t = inputs_embeds.shape[1]
        input_mask = input_mask.astype(jnp.int32)
        if cache is None:
            kv_mask, q_slots = input_mask, jnp.arange(t)
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, input_mask, (0, cache.index))
            q_slots = cache.index + jnp.arange(t)
        aligned = cache is None
        masks = {FULL_ATTENTION: AttentionMask(kv_mask > 0, q_slots, aligned=aligned)}
        if c.sliding_window is not None:
            masks[SLIDING_ATTENTION] = AttentionMask(kv_mask > 0, q_slots, window=c.sliding_window, aligned=aligned)
        ropes = {
            kind: rope_tables(c.rope_for(kind), c.head_dim, positions) for kind in set(c.layer_types) | {FULL_ATTENTION}
        }

        x = inputs_embeds.astype(self.dtype)
        if c.scan_layers:
            # One layer type (checked by the config): one mask and one RoPE for every layer.
            kind = c.layer_type(0)
            mask = masks[kind if c.sliding_window is not None else FULL_ATTENTION]
            x, new_cache = self._scan(x, *ropes[kind], mask, cache, lora=lora)
            if new_cache is not None:
                new_cache = dataclasses.replace(new_cache, mask=kv_mask, index=cache.index + t)
            return self.norm(x), new_cache
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            kind = c.layer_type(i)
            cos, sin = ropes[kind]
            mask = masks[kind if c.sliding_window is not None else FULL_ATTENTION]
            if cache is not None:
                x, (k, v) = layer(x, cos, sin, mask, (cache.keys[i], cache.values[i], cache.index), lora=lora)
                keys.append(k)
                values.append(v)
            elif c.remat != "none":
                x = _remat_layer(layer, x, cos, sin, mask, lora=lora, policy=REMAT_POLICIES[c.remat])
            else:
                x, _ = layer(x, cos, sin, mask, lora=lora)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(keys), values=tuple(values), mask=kv_mask, index=cache.index + t)
        return self.norm(x), new_cache

    def _scan(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: AttentionMask,
        cache: KVCache | None,
        *,
        lora: bool,
    ) -> tuple[jax.Array, KVCache | None]:
        """The stacked layers as one scan; with a cache, each layer's keys and values are scanned too."""
        if cache is None:

            def body(layer: DecoderLayer, x: jax.Array, _: None) -> tuple[jax.Array, None]:
                return layer(x, cos, sin, mask, lora=lora)[0], None

            remat = self.config.remat != "none"
            policy = REMAT_POLICIES[self.config.remat] if remat else None
            x, _ = scan(self.layers, body, x, remat=remat, policy=policy)
            return x, None

        def cached_body(
            layer: DecoderLayer, x: jax.Array, kv: tuple[jax.Array, jax.Array]
        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            return layer(x, cos, sin, mask, (*kv, cache.index), lora=lora)

        x, (keys, values) = scan(self.layers, cached_body, x, (cache.keys, cache.values))
        return x, dataclasses.replace(cache, keys=keys, values=values)

    def unembedding(self) -> jax.Array:
        """The output projection [D, V]: the transposed embedding when tied, else lm_head's kernel."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, D] -> float32 logits [B, T, V], final soft-capping applied if configured."""
        w = self.unembedding().astype(self.dtype)
        out = jnp.einsum("btd,dv->btv", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = jnp.tanh(out / cap) * cap
        return out

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        input_mask: jax.Array | None = None,
        lora: bool = True,
    ) -> jax.Array:
        """tokens [B, T] -> logits [B, T, V] (float32), the text-only path."""
        if input_mask is None:
            input_mask = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = default_positions(input_mask)
        hidden, _ = self.hidden_states(self.embed(tokens), positions=positions, input_mask=input_mask, lora=lora)
        return self.logits(hidden)


def _remat_layer(
    layer: DecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: AttentionMask,
    *,
    lora: bool,
    policy: Any,
) -> jax.Array:
    """One layer under activation checkpointing (recomputed in the backward pass).

    The layer goes through `jax.checkpoint` as a pure function of its state: `nnx.remat`
    would write the state back to the layer's Variables, which fails when those Variables
    were created outside the current trace (the trainer merges the model inside `grad`).
    """
    graphdef, state = nnx.split(layer)

    def run(state: nnx.State, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask) -> jax.Array:
        return nnx.merge(graphdef, state)(x, cos, sin, mask, lora=lora)[0]

    return jax.checkpoint(run, policy=policy)(state, x, cos, sin, mask)
