"""The evaluation harness's core: items -> training-format batches -> scores on the mesh.

Every benchmark (gap, generalisation, retention, diagnostics, ASR) asks the same model
through one `Scorer`, which formats inputs exactly as training does: the question goes
into the prompt's `{content}` as an audio slot (`interleave.whole_utterance`), the chat
frame comes from `data.examples.prompt_segments`, `data.examples.build_example` tokenises
it and builds the text twin, and `data.batching.collate` pads it into a batch. So the
speech condition and the text condition of one item are the student sequence and the
teacher twin of one example, as in a training step.

Three conditions, the same weights:

    "speech"        the student: speech input, LoRA on (the adapted speech LLM)
    "text"          the base LLM: text input, LoRA off (the teacher, the text upper bound)
    "text_adapted"  text input, LoRA on (text retention; forgetting when it departs from "text")

Scoring: option log-likelihoods (summed log-probabilities of an option's tokens from the
chunked cross-entropy of `losses`, per row), greedy generation with `generate.generate`
(KV cache, from the student's inputs_embeds, prompts left-aligned), and SALAD's M and F
with `losses.chunked_misalignment` / `chunked_forgetting`. Batches have static shapes
(rows padded to `batch_size`, lengths rounded up to `length_multiple`, audio to
`sample_multiple`), so each function compiles once per shape; parameters and batches are
placed on the mesh by their logical axes, and the numbers do not depend on the mesh.

Where the speech comes from is a `Speech` (recorded audio files, else the TTS); what the
LLM sees at the audio positions is an `AudioEmbedder` (the SpeechLM's encoder and
projector by default). The oracle pair (`OracleSpeech` + `oracle_audio`) puts the
transcript's own token embeddings at the audio positions, so the student sees exactly
what the teacher reads: the harness must then report gap 0 and M = 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from speechlm_jax.data import interleave, tts
from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.batching import collate
from speechlm_jax.data.examples import Audio, Example, Segment, Text, build_example, leading_space, prompt_segments
from speechlm_jax.data.tokenizer import SpeechTokenizer
from speechlm_jax.evaluation.items import Item
from speechlm_jax.generate import generate
from speechlm_jax.losses.chunked import chunked_cross_entropy, chunked_forgetting, chunked_misalignment
from speechlm_jax.losses.common import gather_teacher
from speechlm_jax.models.frontend import HOP_LENGTH, audio_token_count
from speechlm_jax.models.llm import DecoderLLM
from speechlm_jax.models.speechlm import SpeechLM
from speechlm_jax.sharding import DEFAULT_RULES, Rules, batch_sharding, make_mesh, shard_state

CONDITIONS = ("speech", "text", "text_adapted")
SAMPLE_RATE = 16000
Batch = Mapping[str, jax.Array]


class Speech(Protocol):
    """Where an item's speech comes from: int16 `[samples]` at 16 kHz for `text`."""

    def waveform(self, text: str, audio: str | None) -> np.ndarray: ...


def _int16(waveform: np.ndarray) -> np.ndarray:
    waveform = np.asarray(waveform)
    if waveform.dtype == np.int16:
        return waveform
    return (np.clip(waveform, -1.0, 1.0) * 32767.0).astype(np.int16)


class TTSSpeech:
    """Recorded audio when the item has a file, otherwise `data.tts` speaks the text (cached)."""

    def __init__(self, synthesizer: tts.Synthesizer | None = None, voice: tts.Voice | None = None):
        self._synthesizer = synthesizer
        self.voice = voice if voice is not None else tts.Voice()
        self._cache: dict[str, np.ndarray] = {}

    def waveform(self, text: str, audio: str | None) -> np.ndarray:
        if audio is not None:
            return _int16(load_audio(audio, sample_rate=SAMPLE_RATE))
        text = " ".join(text.split())
        if text not in self._cache:
            if self._synthesizer is None:
                self._synthesizer = tts.EspeakSynthesizer()
            self._cache[text] = _int16(self._synthesizer.synthesize(text, self.voice).audio)
        return self._cache[text]


def oracle_samples(num_tokens: int, downsample: int) -> int:
    """Samples of a clip that gives exactly `num_tokens` audio frames (`audio_token_count`)."""
    return num_tokens * downsample * 2 * HOP_LENGTH


class OracleSpeech:
    """Silent clips as long as the transcript has tokens: one audio frame per transcript token."""

    def __init__(self, tokenizer: SpeechTokenizer, downsample: int):
        self.tokenizer = tokenizer
        self.downsample = downsample

    def waveform(self, text: str, audio: str | None) -> np.ndarray:
        return np.zeros(oracle_samples(len(self.tokenizer.encode(text)), self.downsample), np.int16)


AudioEmbedder = Callable[[SpeechLM, Batch], tuple[jax.Array, jax.Array]]


def model_audio(model: SpeechLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The SpeechLM's own audio embeddings [B, S*F, D] and their valid frames [B, S*F] (LoRA on)."""
    return model.audio_inputs(batch, lora=True)


def oracle_audio(model: SpeechLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The transcript's token embeddings at the audio frames, [B, S*F, D], all valid (with `OracleSpeech`)."""
    tokens = batch["audio_tokens"]
    return model.llm.embed(tokens), jnp.ones(tokens.shape, bool)


@dataclasses.dataclass(eq=False)
class Prepared:
    """A built example and, per audio slot, the token ids of its transcript (for the oracle)."""

    example: Example
    slot_tokens: list[list[int]]


def prepare(segments: Sequence[Segment], tokenizer: SpeechTokenizer, downsample: int) -> Prepared:
    """Segments -> the training example builder's Example, plus each slot's transcript tokens."""
    example = build_example(segments, tokenizer, downsample=downsample)
    slots = [tokenizer.encode(s.transcript) for s in segments if isinstance(s, Audio)]
    return Prepared(example, slots)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _llm(model: SpeechLM | DecoderLLM) -> DecoderLLM:
    return model.llm if isinstance(model, SpeechLM) else model


def _text_hidden(model: SpeechLM | DecoderLLM, batch: Batch, *, lora: bool) -> jax.Array:
    """Final hidden states [B, U, D] of the text twin (`teacher_*` arrays)."""
    llm = _llm(model)
    hidden, _ = llm.hidden_states(
        llm.embed(batch["teacher_tokens"]),
        positions=batch["teacher_positions"],
        input_mask=batch["teacher_input_mask"],
        lora=lora,
    )
    return hidden


def _row_logliks(
    llm: DecoderLLM, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Per row: summed log p(target) over the mask [B] and the number of tokens [B]."""
    unembedding, softcap = llm.unembedding(), llm.config.final_logit_softcapping

    def row(h: jax.Array, t: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        nll, metrics = chunked_cross_entropy(
            h[None], unembedding, t[None], m[None], chunk_size=chunk_size, softcap=softcap
        )
        return -nll * metrics["tokens"], metrics["tokens"]

    return jax.vmap(row)(hidden, targets, mask)


# Module-level programs with the graph and the embedder static: every Scorer of the same
# model structure shares their compiled forms.
@partial(jax.jit, static_argnames=("graphdef", "embedder", "chunk_size"))
def _forward(
    graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, *, embedder: AudioEmbedder, chunk_size: int
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Every teacher-forced score of a batch in one program, each as per-row (sum [B], tokens [B]).

    "text", "text_adapted", "speech": summed log p of the supervised tokens; with a SpeechLM
    also "misalignment" (M over `kl_mask`) and "forgetting" (F over every next text token).
    One program for all of them means one compile per batch shape for every benchmark.
    """
    model = nnx.merge(graphdef, state)
    llm = _llm(model)
    base = _text_hidden(model, batch, lora=False)
    out = {"text": _row_logliks(llm, base, batch["teacher_targets"], batch["teacher_loss_mask"], chunk_size)}
    if not isinstance(model, SpeechLM):
        out["text_adapted"] = out["text"]
        return out
    adapted = _text_hidden(model, batch, lora=True)
    out["text_adapted"] = _row_logliks(llm, adapted, batch["teacher_targets"], batch["teacher_loss_mask"], chunk_size)
    embeds, mask, positions = model.student_inputs(batch, lora=True, audio=embedder(model, batch))
    speech, _ = llm.hidden_states(embeds, positions=positions, input_mask=mask, lora=True)
    out["speech"] = _row_logliks(llm, speech, batch["targets"], batch["loss_mask"], chunk_size)
    unembedding, softcap = llm.unembedding(), llm.config.final_logit_softcapping
    _, m = chunked_misalignment(
        speech,
        gather_teacher(base, batch["teacher_index"]),
        unembedding,
        batch["kl_mask"],
        chunk_size=chunk_size,
        softcap=softcap,
    )
    text_mask = batch["teacher_input_mask"].astype(jnp.float32)
    next_real = jnp.concatenate([text_mask[:, 1:], jnp.zeros_like(text_mask[:, :1])], axis=1)
    _, f = chunked_forgetting(adapted, base, unembedding, next_real, chunk_size=chunk_size, softcap=softcap)
    out["misalignment"] = (m["per_sequence"], m["tokens_per_sequence"])
    out["forgetting"] = (f["per_sequence"], f["tokens_per_sequence"])
    return out


@partial(jax.jit, static_argnames=("graphdef", "embedder", "condition"))
def _prefix(
    graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, *, embedder: AudioEmbedder, condition: str
) -> tuple[jax.Array, jax.Array]:
    """A prompt's input embeddings left-aligned for the decoder: ([B, T, D], mask [B, T])."""
    model = nnx.merge(graphdef, state)
    if condition == "speech":
        embeds, mask, _ = model.student_inputs(batch, lora=True, audio=embedder(model, batch))
    else:
        embeds, mask = _llm(model).embed(batch["teacher_tokens"]), batch["teacher_input_mask"]
    # Real positions move to the end of the row in order, masked ones (padding, and the audio
    # positions a length adapter left empty) to the front: a stable sort on (real, index).
    length = mask.shape[1]
    t = jnp.arange(length)[None, :]
    order = jnp.argsort(jnp.where(mask > 0, t + length, t), axis=1)
    left = jnp.take_along_axis(embeds, order[..., None], axis=1)
    return left, jnp.take_along_axis(mask, order, axis=1).astype(jnp.int32)


class Scorer:
    """Asks one model (a SpeechLM, or a base DecoderLLM for text only) on a mesh; see the module docstring.

    `downsample` is the projector's factor (audio frames per clip); `chunk_size` the positions
    per unembedding chunk of the log-likelihoods; `speech` and `embedder` pick the audio source
    and what the LLM sees at audio positions.
    """

    def __init__(
        self,
        model: SpeechLM | DecoderLLM,
        tokenizer: SpeechTokenizer,
        *,
        downsample: int = 4,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        batch_size: int = 8,
        speech: Speech | None = None,
        embedder: AudioEmbedder = model_audio,
        chunk_size: int = 256,
        length_multiple: int = 32,
        sample_multiple: int = 2 * SAMPLE_RATE,
        max_audio_samples: int = 30 * SAMPLE_RATE,
    ):
        self.has_speech = isinstance(model, SpeechLM)
        self.tokenizer = tokenizer
        self.downsample = downsample
        self.mesh = mesh if mesh is not None else make_mesh({"data": 1}, jax.devices()[:1])
        self.rules = rules
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = _round_up(batch_size, shards)
        self.speech = speech if speech is not None else TTSSpeech()
        self.embedder = embedder
        self.chunk_size = chunk_size
        self.length_multiple = length_multiple
        self.sample_multiple = sample_multiple
        self.max_audio_samples = max_audio_samples
        graphdef, state = nnx.split(model)
        self.state = shard_state(state, self.mesh, rules)
        self.model = nnx.merge(graphdef, self.state)
        self._graphdef = graphdef

    @property
    def llm(self) -> DecoderLLM:
        return _llm(self.model)

    # --- Inputs: items -> segments -> examples -> static-shape batches on the mesh.

    def segments(self, item: Item, *, spoken: bool, response: str | None) -> list[Segment]:
        """The item as the pipeline formats it: prompt around the (spoken or written) question.

        `response` None gives the prompt alone (for generation); otherwise the response is
        supervised without the end-of-turn tokens, so its log-likelihood is the option's own.
        """
        space = leading_space(item.prompt)
        placed = (" " if space else "") + " ".join(item.question.split())
        if spoken:
            waveform = self.speech.waveform(placed, item.audio)
            content = interleave.whole_utterance(
                waveform,
                item.question,
                None,
                lead_space=space,
                max_samples=self.max_audio_samples,
                split_long=True,
                sample_rate=SAMPLE_RATE,
            )
        else:
            content = [Text(placed)]
        segments = prompt_segments(self.tokenizer, item.prompt, content, response or "")
        if response is None:
            return [s for s in segments if not (isinstance(s, Text) and s.supervised)]
        end = Text(self.tokenizer.chat_frame.end_of_turn, supervised=True)
        if segments[-1] != end:
            raise ValueError("prompt_segments no longer ends with the end-of-turn segment")
        return segments[:-1]

    def prepare(self, segments: Sequence[Segment]) -> Prepared:
        """`prepare` with this scorer's tokenizer and downsample factor."""
        return prepare(segments, self.tokenizer, self.downsample)

    def shape(self, prepared: Sequence[Prepared]) -> tuple[int, int, int, int]:
        """(student tokens, teacher tokens, audio slots, samples per slot) that fit every example, rounded up."""
        examples = [p.example for p in prepared]
        return (
            _round_up(max(e.num_tokens for e in examples), self.length_multiple),
            _round_up(max(e.num_teacher_tokens for e in examples), self.length_multiple),
            max(1, max(len(e.audio) for e in examples)),
            _round_up(max(e.max_audio_samples for e in examples), self.sample_multiple),
        )

    def collate(self, prepared: Sequence[Prepared], shape: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
        """Pads up to `batch_size` examples into one batch of `shape`; adds `audio_tokens` [B, S*F] for the oracle."""
        examples = [p.example for p in prepared]
        length, teacher, slots, samples = shape
        batch = collate(
            examples,
            (samples, length),
            batch_size=self.batch_size,
            max_slots=slots,
            teacher_tokens=teacher,
            downsample=self.downsample,
            pad_id=self.tokenizer.pad_id,
        )
        frames = audio_token_count(samples, self.downsample)
        audio_tokens = np.full((self.batch_size, slots * frames), self.tokenizer.pad_id, np.int32)
        for i, p in enumerate(prepared):
            for s, ids in enumerate(p.slot_tokens):
                n = min(len(ids), frames)
                audio_tokens[i, s * frames : s * frames + n] = ids[:n]
        batch["audio_tokens"] = audio_tokens
        return batch

    def _device(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim, self.rules)) for k, v in batch.items()}

    def _batches(self, prepared: Sequence[Prepared]) -> list[tuple[list[int], dict[str, jax.Array]]]:
        """(indices into `prepared`, device batch) over groups of similar length.

        Every batch of one call has the same shape, so a benchmark compiles each function once.
        """
        if not prepared:
            return []
        shape = self.shape(prepared)
        order = sorted(range(len(prepared)), key=lambda i: (prepared[i].example.num_tokens, i))
        groups = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        return [(g, self._device(self.collate([prepared[i] for i in g], shape))) for g in groups]

    # --- Public scoring.

    def _check(self, conditions: Sequence[str]) -> None:
        for condition in conditions:
            if condition not in CONDITIONS:
                raise ValueError(f"unknown condition {condition!r}; known: {CONDITIONS}")
            if condition == "speech" and not self.has_speech:
                raise ValueError("the speech condition needs a SpeechLM; a base LLM answers text only")

    def _scores(self, prepared: Sequence[Prepared], names: Sequence[str]) -> dict[str, np.ndarray]:
        """`_forward` over all examples: per name, [examples, 2] of (sum, tokens)."""
        out = {name: np.zeros((len(prepared), 2), np.float64) for name in names}
        for indices, batch in self._batches(prepared):
            values = jax.device_get(
                _forward(self._graphdef, self.state, batch, embedder=self.embedder, chunk_size=self.chunk_size)
            )
            for name in names:
                out[name][indices, 0] = np.asarray(values[name][0])[: len(indices)]
                out[name][indices, 1] = np.asarray(values[name][1])[: len(indices)]
        return out

    def option_logliks(self, items: Sequence[Item], conditions: Sequence[str]) -> dict[str, list[np.ndarray]]:
        """Per condition and multiple-choice item: [choices, 2] of (summed log-prob, tokens) per option.

        With the speech condition the items are spoken, and the text conditions are read from
        the same examples' text twins.
        """
        self._check(conditions)
        spoken = "speech" in conditions
        prepared, owners = [], []
        for k, item in enumerate(items):
            for choice in item.choices:
                prepared.append(self.prepare(self.segments(item, spoken=spoken, response=choice)))
                owners.append(k)
        flat = self._scores(prepared, conditions)
        owners_np = np.asarray(owners)
        return {c: [flat[c][owners_np == k] for k in range(len(items))] for c in conditions}

    def decode(self, tokens: np.ndarray, length: int) -> str:
        """A generated row up to its length, without the stop token, as text."""
        ids = [int(t) for t in tokens[:length]]
        if ids and ids[-1] in self.tokenizer.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids).strip()

    def generate_prepared(
        self,
        prepared: Sequence[Prepared],
        condition: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        rng: jax.Array | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> tuple[list[str], int]:
        """Greedy (or sampled) answers to prompt-only examples, and the number of tokens generated.

        Sampling folds the batch number into `rng`; `progress(n)` is called after each batch.
        """
        self._check([condition])
        answers = [""] * len(prepared)
        generated = 0
        for b, (indices, batch) in enumerate(self._batches(prepared)):
            embeds, mask = _prefix(
                self._graphdef,
                self.state,
                batch,
                embedder=self.embedder,
                condition="speech" if condition == "speech" else "text",
            )
            out = generate(
                self.llm,
                None,
                mask,
                inputs_embeds=embeds,
                max_new_tokens=max_new_tokens,
                eos_id=self.tokenizer.stop_ids,
                temperature=temperature,
                top_p=top_p,
                rng=None if rng is None else jax.random.fold_in(rng, b),
                pad_id=self.tokenizer.pad_id,
                lora=condition != "text",
            )
            tokens, lengths = jax.device_get((out.tokens, out.lengths))
            for row, i in enumerate(indices):
                answers[i] = self.decode(np.asarray(tokens[row]), int(lengths[row]))
                generated += int(lengths[row])
            if progress is not None:
                progress(len(indices))
        return answers, generated

    def generate_items(self, items: Sequence[Item], condition: str, *, max_new_tokens: int) -> list[str]:
        """Greedy answers of `condition` to each item's prompt."""
        prepared = [self.prepare(self.segments(it, spoken=condition == "speech", response=None)) for it in items]
        return self.generate_prepared(prepared, condition, max_new_tokens=max_new_tokens)[0]

    def divergences(self, prepared: Sequence[Prepared]) -> dict[str, np.ndarray]:
        """SALAD's M (speech vs text) and F (adapted vs base text): per-sequence sums and token counts."""
        self._check(["speech"])
        scores = self._scores(prepared, ("misalignment", "forgetting"))
        return {
            "misalignment": scores["misalignment"][:, 0],
            "misalignment_tokens": scores["misalignment"][:, 1],
            "forgetting": scores["forgetting"][:, 0],
            "forgetting_tokens": scores["forgetting"][:, 1],
        }
