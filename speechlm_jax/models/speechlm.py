"""SpeechLM: Whisper encoder -> projector -> decoder LLM, with the text twin as teacher.

The composition behind every recipe in `docs/ARCHITECTURE.md`. Inside the jitted step:

    audio [B, S, L] int16 --reshape--> [B*S, L] --log-mel (on device)--> [B*S, n_mels, L // 160]
      --encoder, window by window--> [B*S, (L//160 + 1) // 2, d_audio] --projector--> [B*S, F, D]
      --reshape--> [B, S*F, D]
    tokens [B, T] --llm.embed--> [B, T, D]; positions with audio_index >= 0 take the audio
      embedding at that index (per-row gather, so it stays local to each batch shard)
    --llm.hidden_states (LoRA on)--> student hidden [B, T, D] --llm.logits--> [B, T, V]

F = audio_token_count(L, downsample). A slot longer than the encoder's window (30 s for
Whisper) is encoded as consecutive windows whose frames are concatenated before the
projector (`encode_windows`): one audio span in the LLM's sequence, and the same count F,
so nothing downstream of the encoder knows about windows. The teacher is the same LLM with LoRA off on the
batch's text twin (`teacher_tokens`), under stop_gradient: no second copy of the weights.

The optional CTC length adapter (`LengthAdapter`) shortens each slot to about one position
per token: the LLM's own head reads every projector frame (greedy CTC best path), the
frames of each predicted token are mean-pooled (blank frames dropped, a token's repeated
frames merged), and the pooled frames are left-aligned in the slot. Shapes stay static: the
slot keeps its F positions, the unused tail is masked out of attention, and the positions
of the whole row are recounted from the mask, so the LLM reads the audio as a contiguous
run of token-like positions. With output "embeddings" each pooled frame is replaced by the
LLM's input embeddings weighted by the head's posterior for it. It only makes sense once the
connector is CTC-aligned to this LLM (`loss.name = "ctc"`).

Module paths: `encoder/...`, `projector/...`, `llm/...`; `trainable_filter` turns the
names of the parts that train into the nnx filter that splits the model into the
trainable and frozen partitions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from speechlm_jax.losses.chunked import scan_chunks, unembed
from speechlm_jax.losses.ctc import chunked_ctc_greedy, collapse_best_path, kept_frames
from speechlm_jax.models.frontend import HOP_LENGTH, SpecAugment, encoder_frames_of_mel, log_mel_spectrogram
from speechlm_jax.models.llm import DecoderLLM, LLMConfig, default_positions
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


def encode_windows(
    encoder: WhisperEncoder, mels: jax.Array, mel_lens: jax.Array, *, lora: bool = True
) -> tuple[jax.Array, jax.Array]:
    """The encoder over audio of any length, one window at a time, the windows concatenated.

    mels [N, n_mels, M] (the log-mel of each whole clip, so the frames at a window boundary
    see the signal on both sides), mel_lens [N] valid mel frames -> (hidden [N, (M + 1) // 2,
    d_audio], mask [N, (M + 1) // 2] bool). A clip of at most one window (M <= W =
    `encoder.config.max_frames`) is encoded as it is. A longer one is cut into n = ceil(M / W)
    consecutive windows of W frames (the last zero-padded, and masked past the clip's end),
    encoded as n rows of one batch [N * n, n_mels, W], each with its own position table and
    attention, and concatenated back in order, as Whisper's long-form transcription and
    Voxtral do. Since W is even, window k's encoder frames are frames k * W / 2 onwards of the
    concatenation, and a clip of l valid mel frames keeps (l + 1) // 2 valid frames
    (`frontend.encoder_frames_of_mel`), whether it spans one window or many.
    """
    n, n_mels, frames = mels.shape
    valid = jnp.arange(frames)[None, :] < mel_lens[:, None]
    window = encoder.config.max_frames
    if frames <= window:
        return encoder(mels, frame_mask=valid, lora=lora)
    count = -(-frames // window)
    pad = count * window - frames
    mels = jnp.pad(mels, ((0, 0), (0, 0), (0, pad)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    windows = mels.reshape(n, n_mels, count, window).transpose(0, 2, 1, 3).reshape(n * count, n_mels, window)
    hidden, mask = encoder(windows, frame_mask=valid.reshape(n * count, window), lora=lora)
    out = encoder_frames_of_mel(frames)
    return hidden.reshape(n, -1, hidden.shape[-1])[:, :out], mask.reshape(n, -1)[:, :out]


ADAPTER_OUTPUTS = ("frames", "embeddings")


@dataclasses.dataclass(frozen=True)
class LengthAdapter:
    """The CTC length adapter's settings: the head's blank token, its chunk (of positions), its output.

    output "frames": each predicted token's frames, mean-pooled. "embeddings": the LLM's own
    input embeddings, weighted by the head's posterior over the vocabulary (blank excluded) of
    each pooled frame (as LegoSLM connects a CTC encoder to an LLM), so every audio position
    lies in the span of the embeddings the LLM was trained on; `temperature` divides the logits
    first. Both are differentiable in the projector and encoder.
    """

    blank_id: int
    chunk_size: int = 256
    output: str = "frames"
    temperature: float = 1.0

    def __post_init__(self):
        if self.output not in ADAPTER_OUTPUTS:
            raise ValueError(f"length adapter output {self.output!r} is not one of {ADAPTER_OUTPUTS}")
        if self.temperature <= 0:
            raise ValueError(f"length adapter temperature must be positive, got {self.temperature}")


def pool_token_frames(
    embeds: jax.Array, mask: jax.Array, best: jax.Array, *, blank_id: int
) -> tuple[jax.Array, jax.Array]:
    """Mean-pools the frames of each best-path token, left-aligned: ([N, F, D], mask [N, F]).

    embeds [N, F, D], mask [N, F] (real frames), best [N, F] the head's token per frame. A
    token's run starts at a frame that is not blank and not a repeat of the frame before
    (`losses.ctc.kept_frames`); the run is the non-blank frames up to the next start.
    """
    real = mask > 0
    start = kept_frames(best, real, blank_id=blank_id)
    member = real & (best != blank_id)
    run = jnp.cumsum(start, axis=1) - 1  # the run index of each member frame
    f = embeds.shape[1]
    onehot = (member[:, :, None] & (run[:, :, None] == jnp.arange(f)[None, None, :])).astype(jnp.float32)  # [N, F, K]
    sizes = jnp.sum(onehot, axis=1)  # [N, K]
    pooled = jnp.einsum("nfk,nfd->nkd", onehot / jnp.maximum(sizes, 1.0)[:, None, :], embeds.astype(jnp.float32))
    count = jnp.sum(start, axis=1)
    return pooled.astype(embeds.dtype), jnp.arange(f)[None, :] < count[:, None]


class SpeechLM(nnx.Module):
    """Speech encoder + projector + decoder LLM; see the module docstring for the data flow."""

    def __init__(
        self,
        encoder: WhisperEncoder,
        projector: Projector,
        llm: DecoderLLM,
        length_adapter: LengthAdapter | None = None,
        augment: SpecAugment | None = None,
    ):
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.length_adapter = length_adapter
        # SpecAugment in training: applied where the train step's per-row seeds reach the audio.
        self.augment = augment if augment is not None and augment.enabled else None

    def ctc_blank(self) -> jax.Array | None:
        """The connector's learned CTC blank vector [D] (`ProjectorConfig.ctc_blank`), or None."""
        blank = self.projector.ctc_blank
        return None if blank is None else blank[...]

    def best_path(self, embeds: jax.Array, *, blank_id: int | None = None) -> jax.Array:
        """The LLM head's greedy CTC token of every projector frame: embeds [N, F, D] -> [N, F] ids.

        With the connector's learned blank, it stands in for token `blank_id` (default: the
        length adapter's).
        """
        if blank_id is None:
            blank_id = self.length_adapter.blank_id if self.length_adapter is not None else 0
        chunk = self.length_adapter.chunk_size if self.length_adapter is not None else 256
        return chunked_ctc_greedy(
            self.llm.norm(embeds),
            self.llm.unembedding(),
            chunk_size=chunk,
            softcap=self.llm.config.final_logit_softcapping,
            blank_id=blank_id,
            blank=self.ctc_blank(),
        )

    def encode_audio(
        self, audio: jax.Array, audio_lens: jax.Array, *, lora: bool = True, augment_seeds: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """audio [N, L] int16 (or float in [-1, 1]) with audio_lens [N] valid samples ->
        (embeddings [N, F, D], mask [N, F] bool) with F = audio_token_count(L, downsample).

        Row i has audio_token_count(audio_lens[i], downsample) valid frames; an unused slot
        (length 0) yields finite, fully masked output. `augment_seeds` [N]: see `project_audio`.
        """
        embeds, mask = self.project_audio(audio, audio_lens, lora=lora, augment_seeds=augment_seeds)
        if self.length_adapter is not None:
            embeds, mask = pool_token_frames(
                embeds, mask, self.best_path(embeds), blank_id=self.length_adapter.blank_id
            )
            if self.length_adapter.output == "embeddings":
                embeds = self.posterior_embeddings(embeds)
        return embeds, mask

    def posterior_embeddings(self, pooled: jax.Array) -> jax.Array:
        """Each pooled frame [N, K, D] as the LLM's input embedding expected under its head's
        posterior (blank excluded): softmax(head(norm(frame)) / temperature) @ embedding table.

        Chunked over positions like the losses (`losses.chunked.scan_chunks`), so `[N, K, vocab]`
        never exists whole; a one-hot posterior gives exactly `llm.embed` of that token.
        """
        adapter, llm = self.length_adapter, self.llm
        table = llm.embed_tokens.embedding[...]
        softcap = llm.config.final_logit_softcapping

        def per_chunk(w: jax.Array, h: jax.Array) -> tuple[jax.Array]:
            logits = unembed(h, w, softcap).at[..., adapter.blank_id].set(-jnp.inf)
            probs = jax.nn.softmax(logits / adapter.temperature, axis=-1)
            return (jnp.einsum("nkv,vd->nkd", probs.astype(table.dtype), table, preferred_element_type=jnp.float32),)

        (mixed,) = scan_chunks(per_chunk, llm.unembedding(), (llm.norm(pooled),), adapter.chunk_size)
        if llm.config.scale_embeddings:
            mixed = mixed * llm.config.hidden_size**0.5
        return mixed.astype(pooled.dtype)

    def project_audio(
        self, audio: jax.Array, audio_lens: jax.Array, *, lora: bool = True, augment_seeds: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Log-mel -> encoder (window by window) -> projector: (frames [N, F, D], mask [N, F]),
        before any length adapter.

        `augment_seeds` [N] int (the train step's, `train.step.with_augment_seeds`): each row's
        log-mel is SpecAugment-masked with its seed when the model has a policy (`augment`);
        without seeds (evaluation, generation) the audio is never masked.
        """
        mels = log_mel_spectrogram(audio, n_mels=self.encoder.config.num_mel_bins)
        mel_lens = audio_lens // HOP_LENGTH
        if self.augment is not None and augment_seeds is not None:
            mels = self.augment.rows(mels, mel_lens, augment_seeds)
        hidden, mask = encode_windows(self.encoder, mels, mel_lens, lora=lora)
        return self.projector(hidden, mask, lora=lora)

    def ctc_transcript(self, audio: jax.Array, audio_lens: jax.Array, *, blank_id: int, max_labels: int) -> jax.Array:
        """The connector's own ASR: greedy CTC through the LLM's head.

        audio [N, L] with audio_lens [N] -> token ids [N, max_labels], -1 after the end.
        """
        embeds, mask = self.project_audio(audio, audio_lens)
        return collapse_best_path(
            self.best_path(embeds, blank_id=blank_id), mask, blank_id=blank_id, max_labels=max_labels
        )

    def encode_slots(self, batch: Batch, *, lora: bool = True) -> tuple[jax.Array, jax.Array]:
        """The batch's audio [B, S, L] -> every slot's (embeddings [B*S, F, D], mask [B*S, F])."""
        audio = batch["audio"]
        b, s, length = audio.shape
        seeds = batch.get("augment_seeds")
        return self.encode_audio(
            audio.reshape(b * s, length),
            batch["audio_lens"].reshape(b * s),
            lora=lora,
            augment_seeds=None if seeds is None else seeds.reshape(b * s),
        )

    def audio_embeddings(self, batch: Batch, *, lora: bool = True) -> jax.Array:
        """The batch's audio [B, S, L] -> its audio embeddings [B, S*F, D], slot-major per row."""
        return self.audio_inputs(batch, lora=lora)[0]

    def audio_inputs(self, batch: Batch, *, lora: bool = True) -> tuple[jax.Array, jax.Array]:
        """The batch's audio -> (embeddings [B, S*F, D], valid [B, S*F] bool), slot-major per row."""
        embeds, mask = self.encode_slots(batch, lora=lora)
        b = batch["audio"].shape[0]
        return embeds.reshape(b, -1, embeds.shape[2]), mask.reshape(b, -1)

    def student_inputs(
        self, batch: Batch, *, lora: bool = True, audio: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The student's (input embeddings [B, T, D], input_mask [B, T], positions [B, T]).

        Without the length adapter the mask and positions are the batch's own. With it, the
        audio positions past each slot's pooled frames leave the mask and the positions are
        recounted from it. `audio` = (embeddings [B, S*F, D], valid [B, S*F]) replaces the
        encoder path when given (cached or oracle embeddings).
        """
        if audio is None and ("audio" not in batch or batch["audio"].shape[1] == 0):
            return self.llm.embed(batch["tokens"]), batch["input_mask"], batch["positions"]
        embeds, valid = audio if audio is not None else self.audio_inputs(batch, lora=lora)
        inputs = self.embed_inputs(batch, lora=lora, audio_embeds=embeds)
        if self.length_adapter is None:
            return inputs, batch["input_mask"], batch["positions"]
        index = batch["audio_index"]
        kept = jnp.take_along_axis(valid, jnp.maximum(index, 0), axis=1) | (index < 0)
        mask = batch["input_mask"] * kept.astype(batch["input_mask"].dtype)
        return inputs, mask, default_positions(mask)

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
        audio = None if audio_embeds is None else (audio_embeds, jnp.ones(audio_embeds.shape[:2], bool))
        embeds, mask, positions = self.student_inputs(batch, lora=lora, audio=audio)
        hidden, _ = self.llm.hidden_states(embeds, positions=positions, input_mask=mask, lora=lora)
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
    length_adapter: LengthAdapter | None = None,
    augment: SpecAugment | None = None,
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
    return SpeechLM(encoder, projector, llm, length_adapter, augment)


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
