"""Projectors: encoder frames [batch, frames, d_audio] -> LLM embeddings [batch, frames // k, d_llm].

Second stage of the speech path in `docs/ARCHITECTURE.md` (encoder -> **projector** -> audio
embeddings scattered into the LLM input). Both projectors downsample time by `k`, so a
clip of n encoder frames yields n // k audio tokens (`audio_token_count`): an output frame
is valid only when all k encoder frames it summarises are valid.

- `FrameStackProjector`: stack k consecutive frames (reshape [B, F//k, k*d]) -> Linear ->
  GELU/SiLU -> Linear. With `use_bias=False`, GELU and hidden = d_llm this is exactly
  Voxtral's `multi_modal_projector` (linear_1, act, linear_2); with bias it is SLAM-LLM's
  "linear" adapter.
- `ConvProjector`: BLSP-style strided Conv1d downsampler (width >= stride = k) -> GELU ->
  Linear to d_llm.

Module paths: `linear_1`, `linear_2` (frame stack); `conv`, `linear` (conv); `ctc_blank` (either,
with `ctc_blank=True`): the connector's own CTC blank, a learned [d_llm] vector that stands in
for the blank token's row of the LLM's unembedding when the frames are read out by CTC through
the LLM's head (`losses.ctc`). A frozen LLM's blank (its pad token) is a row it never learnt to
predict: measured on the toy teacher, no frame at all can give it more than 13% probability,
where CTC needs blank on most frames. The blank has no part in the LLM's input: only the
CTC readouts (alignment loss, length adapter, cascade transcript) use it.
`ProjectorConfig` + `make_projector` pick one from a config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from speechlm_jax.models.layers import Linear
from speechlm_jax.models.whisper import ACTIVATIONS, Conv1d


def downsample_mask(mask: jax.Array, k: int) -> jax.Array:
    """mask [batch, frames] -> [batch, frames // k] bool: valid when all k frames are valid."""
    batch, frames = mask.shape
    kept = (frames // k) * k
    return mask[:, :kept].astype(bool).reshape(batch, frames // k, k).all(axis=-1)


def blank_param(d_llm: int, enabled: bool, param_dtype: jnp.dtype) -> nnx.Param | None:
    """The learned CTC blank (zeros: blank starts at logit 0 and learns its own direction), or None."""
    return nnx.data(nnx.Param(jnp.zeros((d_llm,), param_dtype), axes=("embed",)) if enabled else None)


class FrameStackProjector(nnx.Module):
    """Stacks k frames, then a two-layer MLP to d_llm (Voxtral / SLAM-LLM linear adapter)."""

    def __init__(
        self,
        d_audio: int,
        d_llm: int,
        *,
        stack: int,
        hidden: int | None = None,
        activation: str = "gelu",
        use_bias: bool = False,
        ctc_blank: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        hidden = d_llm if hidden is None else hidden
        self.stack = stack
        self.ctc_blank = blank_param(d_llm, ctc_blank, param_dtype)
        self.activation = ACTIVATIONS[activation]
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(stack * d_audio, hidden, axes=("embed", "mlp"), **common)
        self.linear_2 = Linear(hidden, d_llm, axes=("mlp", "embed"), **common)

    def __call__(self, h: jax.Array, mask: jax.Array, *, lora: bool = True) -> tuple[jax.Array, jax.Array]:
        """h [batch, frames, d_audio], mask [batch, frames] -> ([batch, frames // k, d_llm], mask [batch, frames // k]).

        Trailing frames that do not fill a group of k are dropped.
        """
        batch, frames, d_audio = h.shape
        out_frames = frames // self.stack
        stacked = h[:, : out_frames * self.stack].reshape(batch, out_frames, self.stack * d_audio)
        y = self.linear_2(self.activation(self.linear_1(stacked, lora=lora)), lora=lora)
        return y, downsample_mask(mask, self.stack)


class ConvProjector(nnx.Module):
    """Strided Conv1d downsampler (BLSP style) followed by a Linear to d_llm."""

    def __init__(
        self,
        d_audio: int,
        d_llm: int,
        *,
        stride: int,
        width: int | None = None,
        hidden: int | None = None,
        activation: str = "gelu",
        ctc_blank: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = stride if width is None else width
        if width < stride:
            raise ValueError(f"conv width {width} must be >= stride {stride}")
        hidden = d_llm if hidden is None else hidden
        self.stride = stride
        self.width = width
        self.ctc_blank = blank_param(d_llm, ctc_blank, param_dtype)
        self.activation = ACTIVATIONS[activation]
        # Padding width - stride (split left/right) keeps exactly frames // stride outputs, each
        # centred on its own group of `stride` frames.
        self.pad = ((width - stride) // 2, width - stride - (width - stride) // 2)
        self.conv = Conv1d(
            d_audio,
            hidden,
            width=width,
            stride=stride,
            padding=0,
            axes=("conv_width", "embed", "mlp"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.linear = Linear(
            hidden, d_llm, axes=("mlp", "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, h: jax.Array, mask: jax.Array, *, lora: bool = True) -> tuple[jax.Array, jax.Array]:
        """h [batch, frames, d_audio], mask [batch, frames] -> ([batch, frames // k, d_llm], mask [batch, frames // k]).

        A clip's valid outputs do not depend on how much padding follows it in the batch.
        """
        kept = (h.shape[1] // self.stride) * self.stride
        out_mask = downsample_mask(mask, self.stride)
        # Frames outside complete valid groups are zeroed, so wide kernels see the same zeros
        # after a clip whether it runs alone or padded in a batch.
        h = jnp.where(jnp.repeat(out_mask, self.stride, axis=1)[..., None], h[:, :kept], 0)
        h = jnp.pad(h, ((0, 0), self.pad, (0, 0)))
        y = self.linear(self.activation(self.conv(h)), lora=lora)
        return y, out_mask


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Which projector and its shape. `downsample` is k (the `downsample` of `audio_token_count`).

    kind "frame_stack": FrameStackProjector (`use_bias` False = Voxtral, True = SLAM-LLM);
    kind "conv": ConvProjector (`width` defaults to k). `ctc_blank`: a learned CTC blank vector.
    """

    kind: str = "frame_stack"
    downsample: int = 4
    hidden: int | None = None
    activation: str = "gelu"
    use_bias: bool = False
    width: int | None = None
    ctc_blank: bool = False

    def __post_init__(self):
        if self.kind not in ("frame_stack", "conv"):
            raise ValueError(f"projector kind {self.kind!r} is not 'frame_stack' or 'conv'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")


Projector = FrameStackProjector | ConvProjector


def make_projector(
    config: ProjectorConfig,
    d_audio: int,
    d_llm: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> Projector:
    """The projector a `ProjectorConfig` names, mapping d_audio encoder frames to d_llm embeddings."""
    common = dict(
        hidden=config.hidden,
        activation=config.activation,
        ctc_blank=config.ctc_blank,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    if config.kind == "frame_stack":
        return FrameStackProjector(d_audio, d_llm, stack=config.downsample, use_bias=config.use_bias, **common)
    return ConvProjector(d_audio, d_llm, stride=config.downsample, width=config.width, **common)
