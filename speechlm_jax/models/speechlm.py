"""SpeechLM: Whisper encoder -> projector -> decoder LLM, with the text twin as teacher.

The composition behind every recipe in `docs/ARCHITECTURE.md`. Inside the jitted step:

    audio [B, S, L] int16 --reshape--> [B*S, L] --log-mel (on device)--> [B*S, n_mels, L // 160]
      --encoder--> [B*S, (L//160 + 1) // 2, d_audio] --projector--> [B*S, F, D] --reshape--> [B, S*F, D]
    tokens [B, T] --llm.embed--> [B, T, D]; positions with audio_index >= 0 take the audio
      embedding at that index (per-row gather, so it stays local to each batch shard)
    --llm.hidden_states (LoRA on)--> student hidden [B, T, D] --llm.logits--> [B, T, V]

F = audio_token_count(L, downsample). The teacher is the same LLM with LoRA off on the
batch's text twin (`teacher_tokens`), under stop_gradient: no second copy of the weights.

Module paths: `encoder/...`, `projector/...`, `llm/...`; `trainable_filter` turns the
names of the parts that train into the nnx filter that splits the model into the
trainable and frozen partitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from speechlm_jax.models.frontend import HOP_LENGTH, log_mel_spectrogram
from speechlm_jax.models.llm import DecoderLLM, LLMConfig
from speechlm_jax.models.lora import LoRAConfig, apply_lora
from speechlm_jax.models.projector import Projector, ProjectorConfig, make_projector
from speechlm_jax.models.whisper import WhisperConfig, WhisperEncoder

Batch = Mapping[str, jax.Array]


def scatter_audio(text_embeds: jax.Array, audio_embeds: jax.Array, audio_index: jax.Array) -> jax.Array:
    """Puts audio embeddings at the audio positions of each row.

    text_embeds [B, T, D], audio_embeds [B, S*F, D], audio_index [B, T] (-1 = text, else the
    index into the row's audio embeddings) -> [B, T, D]. Text positions are returned bit-exact.
    """
    gathered = jnp.take_along_axis(audio_embeds, jnp.maximum(audio_index, 0)[..., None], axis=1)
    return jnp.where((audio_index >= 0)[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class SpeechLM(nnx.Module):
    """Speech encoder + projector + decoder LLM; see the module docstring for the data flow."""

    def __init__(self, encoder: WhisperEncoder, projector: Projector, llm: DecoderLLM):
        self.encoder = encoder
        self.projector = projector
        self.llm = llm

    def encode_audio(self, audio: jax.Array, audio_lens: jax.Array, *, lora: bool = True) -> tuple[jax.Array, jax.Array]:
        """audio [N, L] int16 (or float in [-1, 1]) with audio_lens [N] valid samples ->
        (embeddings [N, F, D], mask [N, F] bool) with F = audio_token_count(L, downsample).

        Row i has audio_token_count(audio_lens[i], downsample) valid frames; an unused slot
        (length 0) yields finite, fully masked output.
        """
        mels = log_mel_spectrogram(audio, n_mels=self.encoder.config.num_mel_bins)
        frames = jnp.arange(mels.shape[-1])
        frame_mask = frames[None, :] < (audio_lens // HOP_LENGTH)[:, None]
        hidden, mask = self.encoder(mels, frame_mask=frame_mask, lora=lora)
        return self.projector(hidden, mask, lora=lora)

    def encode_slots(self, batch: Batch, *, lora: bool = True) -> tuple[jax.Array, jax.Array]:
        """The batch's audio [B, S, L] -> every slot's (embeddings [B*S, F, D], mask [B*S, F])."""
        audio = batch["audio"]
        b, s, length = audio.shape
        return self.encode_audio(audio.reshape(b * s, length), batch["audio_lens"].reshape(b * s), lora=lora)

    def audio_embeddings(self, batch: Batch, *, lora: bool = True) -> jax.Array:
        """The batch's audio [B, S, L] -> its audio embeddings [B, S*F, D], slot-major per row."""
        embeds, _ = self.encode_slots(batch, lora=lora)
        b = batch["audio"].shape[0]
        return embeds.reshape(b, -1, embeds.shape[2])

    def embed_inputs(self, batch: Batch, *, lora: bool = True, audio_embeds: jax.Array | None = None) -> jax.Array:
        """Student input embeddings [B, T, D]: token embeddings with audio scattered in.

        `audio_embeds` [B, S*F, D] replaces the encoder path when given (cached or oracle
        embeddings); a batch without `audio` (or with S = 0) is text only.
        """
        text = self.llm.embed(batch["tokens"])
        if audio_embeds is None:
            if "audio" not in batch or batch["audio"].shape[1] == 0:
                return text
            audio_embeds = self.audio_embeddings(batch, lora=lora)
        return scatter_audio(text, audio_embeds, batch["audio_index"])

    def student_hidden(self, batch: Batch, lora: bool = True, *, audio_embeds: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, D] of the student (speech or interleaved input)."""
        embeds = self.embed_inputs(batch, lora=lora, audio_embeds=audio_embeds)
        hidden, _ = self.llm.hidden_states(embeds, positions=batch["positions"], input_mask=batch["input_mask"], lora=lora)
        return hidden

    def teacher_hidden(self, batch: Batch) -> jax.Array:
        """Final-normed hidden states [B, U, D] of the teacher: the text twin, LoRA off, no gradient."""
        hidden, _ = self.llm.hidden_states(
            self.llm.embed(batch["teacher_tokens"]),
            positions=batch["teacher_positions"],
            input_mask=batch["teacher_input_mask"],
            lora=False,
        )
        return jax.lax.stop_gradient(hidden)

    def __call__(self, batch: Batch, lora: bool = True) -> jax.Array:
        """Student logits [B, T, V] (float32)."""
        return self.llm.logits(self.student_hidden(batch, lora=lora))


def build_speechlm(
    encoder_cfg: WhisperConfig,
    projector_cfg: ProjectorConfig,
    llm_cfg: LLMConfig,
    lora_cfg: LoRAConfig | None,
    *,
    encoder_lora_cfg: LoRAConfig | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> SpeechLM:
    """A randomly initialised SpeechLM (wrap in `nnx.eval_shape` to get only shapes).

    `lora_cfg` adds adapters to the LLM, its `targets` searched in the LLM's own module
    paths (`layers/3/attn/q_proj`); `encoder_lora_cfg` likewise for the encoder
    (`layers/0/attn/q_proj`). Scoping by part keeps an LLM regex such as `.*q_proj$`
    from also adapting the encoder. Pretrained weights come from `models.hf_import`
    (`load_whisper_encoder`, `load_llm`) and compose the same way: `SpeechLM(encoder,
    projector, llm)`, then `apply_lora` on the parts.
    """
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    encoder = WhisperEncoder(encoder_cfg, **common)
    llm = DecoderLLM(llm_cfg, **common)
    projector = make_projector(projector_cfg, encoder_cfg.d_model, llm_cfg.hidden_size, **common)
    if lora_cfg is not None:
        apply_lora(llm, lora_cfg, rngs=rngs, param_dtype=param_dtype)
    if encoder_lora_cfg is not None:
        apply_lora(encoder, encoder_lora_cfg, rngs=rngs, param_dtype=param_dtype)
    return SpeechLM(encoder, projector, llm)


# What each name in `trainable_filter(kinds)` selects. LoRAParam subclasses Param, so
# "encoder" / "llm" (full fine-tuning) include that part's adapters; the fixed position
# table (`whisper.Buffer`) is never trainable.
TRAINABLE_KINDS: dict[str, nnx.filterlib.Filter] = {
    "projector": nnx.All(nnx.Param, nnx.PathContains("projector")),
    "lora": nnx.All(nnx.LoRAParam, nnx.PathContains("llm")),
    "encoder_lora": nnx.All(nnx.LoRAParam, nnx.PathContains("encoder")),
    "encoder": nnx.All(nnx.Param, nnx.PathContains("encoder")),
    "llm": nnx.All(nnx.Param, nnx.PathContains("llm")),
}


def trainable_filter(kinds: Sequence[str]) -> nnx.filterlib.Filter:
    """The nnx filter of the parameters that train, from part names in `TRAINABLE_KINDS`.

    "projector": the projector; "lora": the LLM's adapters; "encoder_lora": the encoder's
    adapters; "encoder": the whole encoder; "llm": the whole LLM. Typical use:

        graphdef, trainable, frozen = nnx.split(model, trainable_filter(["projector", "lora"]), ...)

    (`...` takes everything else, buffers included, as the frozen partition).
    """
    unknown = [k for k in kinds if k not in TRAINABLE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"trainable kinds {list(kinds)} must be a non-empty subset of {sorted(TRAINABLE_KINDS)}")
    return nnx.Any(*(TRAINABLE_KINDS[k] for k in kinds))
