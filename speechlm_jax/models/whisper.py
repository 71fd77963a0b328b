"""Whisper audio encoder (Flax NNX): log-mel [batch, n_mels, frames] -> [batch, frames', d_model].

First stage of the speech path in `docs/ARCHITECTURE.md`: waveform -> log-mel (on device) ->
**encoder** -> projector -> audio embeddings scattered into the LLM's input. Shapes and
numerics follow transformers' `WhisperEncoder`: conv1 (k=3, pad 1) + GELU, conv2 (k=3,
stride 2, pad 1) + GELU, the fixed sinusoid position table, pre-LN transformer layers
(k_proj without bias), final LayerNorm.

Unlike the HF module, the window may be shorter than 30 s: `frames` < 3000 mel frames
use the first `(frames + 1) // 2` position rows, and `frame_mask` marks the valid mel
frames of each row so a batch of short clips padded to one bucket attends only to real
frames. With a mask, padded mel frames and padded conv1 outputs are zeroed, so the valid
outputs of a padded clip equal those of the same clip run alone (the convs see exactly
the zero padding they would see at the clip's end). Audio longer than the window is cut
into windows and encoded window by window by `models.speechlm.encode_windows`.

`attention` (ours, not an HF field) picks the attention implementation (`layers.ATTENTION`):
the einsum reference or `jax.nn.dot_product_attention` with the padding as a [batch, 1, 1,
frames] key mask. `scan_layers` (ours too) stores the layers as one stacked layer run by
`jax.lax.scan` (`layers.stack_layers`; paths `layers/attn/q_proj`, ... with a leading
`layers` axis), so the encoder compiles one layer whatever its depth.

Module paths (what LoRA regexes and the HF mapping see): `conv1`, `conv2`,
`embed_positions`, `layers/<i>/attn/{q_proj,k_proj,v_proj,out_proj}`,
`layers/<i>/attn_norm`, `layers/<i>/mlp/{fc1,fc2}`, `layers/<i>/mlp_norm`, `layer_norm`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speechlm_jax.models.layers import (
    LayerNorm,
    Linear,
    check_attention,
    default_init,
    fused_attention,
    scan,
    stack_layers,
)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The encoder half of a transformers `WhisperConfig` (HF field names)."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention: str = "einsum"
    scan_layers: bool = False

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} does not divide into {self.encoder_attention_heads} heads")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation_function!r} not in {sorted(ACTIVATIONS)}")
        check_attention(self.attention)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_frames(self) -> int:
        """Mel frames of a full window (3000 = 30 s for every released Whisper)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> WhisperConfig:
        """From a transformers `WhisperConfig` (or its dict); decoder fields are ignored;
        `overrides` set our own fields (`OWN_FIELDS`, e.g. attention)."""
        values = dict(config) if isinstance(config, Mapping) else config.to_dict()
        names = {f.name for f in dataclasses.fields(cls)} - {"layer_norm_eps"} - set(OWN_FIELDS)
        return cls(**{name: values[name] for name in names if name in values}, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """A dict `transformers.WhisperConfig(**d)` accepts; the decoder mirrors the encoder's
        shape, as in every released Whisper, so the full model builds."""
        out = dataclasses.asdict(self)
        for name in ("layer_norm_eps", *OWN_FIELDS):
            out.pop(name)
        out.update(
            model_type="whisper",
            decoder_layers=self.encoder_layers,
            decoder_attention_heads=self.encoder_attention_heads,
            decoder_ffn_dim=self.encoder_ffn_dim,
        )
        return out


# Fields of ours that no HF config carries: how the encoder runs, not what it is.
OWN_FIELDS = ("attention", "scan_layers")


def encoder_frames(mel_frames: int) -> int:
    """Encoder output frames for `mel_frames` input frames (conv2 has stride 2, padding 1)."""
    return (mel_frames + 1) // 2


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table [length, channels] (sin | cos halves), float32.

    Computed in float64 and rounded once. The reference computes in float32, whose rounding
    of the angle grows with the position (up to ~1.2e-4 apart at row 1500), so converted
    checkpoints import their own table instead of relying on this one.
    """
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    scaled = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class Buffer(nnx.Variable):
    """A fixed array that belongs to the model but never trains (not an `nnx.Param`).

    Trainable filters built on `nnx.Param` skip it, so it has no gradient or optimizer
    state; it still travels with the frozen state and is sharded by its `axes`.
    """


class Conv1d(nnx.Module):
    """1-D convolution over [batch, time, channels]; kernel [width, in, out] (HF stores [out, in, width])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        width: int,
        stride: int,
        padding: int,
        axes: tuple[str | None, ...],
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.kernel = nnx.Param(default_init(rngs.params(), (width, in_features, out_features), param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), axes=axes[2:])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, time, in] -> [batch, (time + 2 * padding - width) // stride + 1, out]."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class WhisperAttention(nnx.Module):
    """Bidirectional multi-head self-attention; k_proj has no bias (as in Whisper)."""

    def __init__(self, config: WhisperConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.head_dim
        self.attention = config.attention
        self.dtype = dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, d, axes=("embed", "heads"), use_bias=True, **common)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), use_bias=False, **common)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), use_bias=True, **common)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), use_bias=True, **common)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None, *, lora: bool = True) -> jax.Array:
        """x [batch, frames, d_model], key_mask [batch, frames] bool (None: all valid) -> [batch, frames, d_model]."""
        batch, frames, _ = x.shape
        split = lambda t: t.reshape(batch, frames, self.num_heads, self.head_dim)
        # Scaling q before the product follows the reference order of operations.
        q = split(self.q_proj(x, lora=lora) * jnp.asarray(self.head_dim**-0.5, self.dtype))
        k = split(self.k_proj(x, lora=lora))
        v = split(self.v_proj(x, lora=lora))
        if self.attention != "einsum":
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = fused_attention(q, k, v, attention=self.attention, scale=1.0, mask=mask)
            return self.out_proj(out.reshape(batch, frames, -1), lora=lora)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if key_mask is not None:
            # A finite floor keeps fully padded rows (unused audio slots) free of NaN.
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, frames, -1)
        return self.out_proj(out, lora=lora)


class WhisperMLP(nnx.Module):
    def __init__(self, config: WhisperConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(config.d_model, config.encoder_ffn_dim, axes=("embed", "mlp"), **common)
        self.fc2 = Linear(config.encoder_ffn_dim, config.d_model, axes=("mlp", "embed"), **common)
        self.activation = ACTIVATIONS[config.activation_function]

    def __call__(self, x: jax.Array, *, lora: bool = True) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x, lora=lora)), lora=lora)


class WhisperEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: WhisperConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = LayerNorm(config.d_model, eps=config.layer_norm_eps, param_dtype=param_dtype)
        self.attn = WhisperAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = LayerNorm(config.d_model, eps=config.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = WhisperMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None, *, lora: bool = True) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), key_mask, lora=lora)
        return x + self.mlp(self.mlp_norm(x), lora=lora)


class WhisperEncoder(nnx.Module):
    """Whisper's audio encoder; see the module docstring for the short-window and mask rules."""

    def __init__(
        self,
        config: WhisperConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        d = config.d_model
        common = dict(width=3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv1d(config.num_mel_bins, d, stride=1, axes=("conv_width", "mels", "embed"), **common)
        self.conv2 = Conv1d(d, d, stride=2, axes=("conv_width", "embed", "embed"), **common)
        table = jnp.asarray(sinusoids(config.max_source_positions, d), param_dtype)
        self.embed_positions = Buffer(table, axes=("audio_frames", "embed"))
        make = lambda: WhisperEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.scan_layers:
            self.layers = stack_layers(make, config.encoder_layers)
        else:
            self.layers = nnx.List([make() for _ in range(config.encoder_layers)])
        self.layer_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=param_dtype)

    def __call__(
        self, mels: jax.Array, *, frame_mask: jax.Array | None = None, lora: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """mels [batch, n_mels, frames] (frames <= 2 * max_source_positions), frame_mask [batch, frames]
        (nonzero = valid; None = all valid) -> (hidden [batch, (frames + 1) // 2, d_model],
        mask [batch, (frames + 1) // 2] bool).

        An output frame is valid when the mel frame at its centre (2 * j) is valid, so a clip
        of n valid mel frames has (n + 1) // 2 valid outputs, as `audio_token_count` counts.
        """
        batch, n_mels, frames = mels.shape
        if n_mels != self.config.num_mel_bins:
            raise ValueError(f"encoder expects {self.config.num_mel_bins} mel bins, got {n_mels}")
        if frames > self.config.max_frames:
            raise ValueError(f"{frames} mel frames exceed the {self.config.max_frames}-frame window")
        x = jnp.swapaxes(mels, 1, 2).astype(self.dtype)
        valid = None if frame_mask is None else frame_mask.astype(bool)
        if valid is not None:
            x = jnp.where(valid[..., None], x, 0)
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        if valid is not None:
            x = jnp.where(valid[..., None], x, 0)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        out_frames = x.shape[1]
        x = x + self.embed_positions[:out_frames].astype(self.dtype)
        key_mask = None if valid is None else valid[:, ::2]
        if self.config.scan_layers:
            x, _ = scan(self.layers, lambda layer, x, _: (layer(x, key_mask, lora=lora), None), x)
        else:
            for layer in self.layers:
                x = layer(x, key_mask, lora=lora)
        x = self.layer_norm(x)
        mask = jnp.ones((batch, out_frames), bool) if key_mask is None else key_mask
        return x, mask
