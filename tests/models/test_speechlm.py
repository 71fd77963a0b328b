"""SpeechLM composition: batch layout, audio scatter, text-only exactness, the oracle, partitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from speechlm_jax.models.frontend import audio_token_count
from speechlm_jax.models.llm import LLMConfig
from speechlm_jax.models.lora import LoRAConfig
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import build_speechlm, scatter_audio, trainable_filter
from speechlm_jax.models.whisper import WhisperConfig

ENCODER = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)
# Gemma-style embedding scale on purpose: audio embeddings must bypass it.
LLM = LLMConfig(
    model_type="gemma3_text",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    hidden_act="gelu_pytorch_tanh",
    qk_norm=True,
    sandwich_norm=True,
    zero_centered_norm=True,
    scale_embeddings=True,
    query_pre_attn_scalar=8.0,
    tie_word_embeddings=True,
    final_logit_softcapping=30.0,
)
DOWNSAMPLE = 2
SAMPLES = 160 * 40  # 40 mel frames -> 20 encoder frames -> 10 audio tokens per slot
PLACEHOLDER = 3


def make_model(seed: int = 0, **kwargs):
    return build_speechlm(
        ENCODER, ProjectorConfig(downsample=DOWNSAMPLE), LLM, LoRAConfig(rank=4), rngs=nnx.Rngs(seed), **kwargs
    )


def make_batch(seed: int = 0, slots: int = 2, batch: int = 2, length: int = 40) -> dict[str, np.ndarray]:
    """Rows of [text, audio slot 0, text, audio slot 1 (second row: unused), text, padding]."""
    rng = np.random.default_rng(seed)
    frames = audio_token_count(SAMPLES, DOWNSAMPLE)
    audio = rng.integers(-8000, 8000, size=(batch, slots, SAMPLES)).astype(np.int16)
    audio_lens = np.full((batch, slots), SAMPLES, np.int32)
    audio_lens[1, 1] = 0
    audio_lens[1, 0] = 160 * 23
    tokens = rng.integers(4, LLM.vocab_size, size=(batch, length)).astype(np.int32)
    audio_index = np.full((batch, length), -1, np.int32)
    input_mask = np.ones((batch, length), np.int32)
    for b in range(batch):
        start = 2
        for s in range(slots):
            n = audio_token_count(int(audio_lens[b, s]), DOWNSAMPLE)
            audio_index[b, start : start + n] = s * frames + np.arange(n)
            start += n + 3
        input_mask[b, start:] = 0
    tokens[audio_index >= 0] = PLACEHOLDER
    positions = np.maximum(np.cumsum(input_mask, axis=1) - 1, 0).astype(np.int32)
    return dict(
        audio=audio,
        audio_lens=audio_lens,
        tokens=tokens,
        positions=positions,
        input_mask=input_mask,
        audio_index=audio_index,
    )


def test_encode_audio_shapes_and_valid_frames():
    model = make_model()
    batch = make_batch()
    audio = jnp.asarray(batch["audio"].reshape(-1, SAMPLES))
    lens = jnp.asarray(batch["audio_lens"].reshape(-1))
    embeds, mask = jax.jit(lambda a, n: model.encode_audio(a, n))(audio, lens)
    frames = audio_token_count(SAMPLES, DOWNSAMPLE)
    assert embeds.shape == (4, frames, LLM.hidden_size)
    assert np.asarray(mask).sum(axis=1).tolist() == [audio_token_count(int(n), DOWNSAMPLE) for n in np.asarray(lens)]
    assert bool(jnp.isfinite(embeds).all())


def test_embed_inputs_gathers_each_rows_own_audio():
    model = make_model()
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    audio = model.audio_embeddings(batch)
    frames = audio_token_count(SAMPLES, DOWNSAMPLE)
    assert audio.shape == (2, 2 * frames, LLM.hidden_size)
    per_slot, _ = model.encode_audio(batch["audio"].reshape(4, SAMPLES), batch["audio_lens"].reshape(4))
    np.testing.assert_array_equal(np.asarray(audio[1, frames:]), np.asarray(per_slot[3]))
    embeds = np.asarray(model.embed_inputs(batch))
    text = np.asarray(model.llm.embed(batch["tokens"]))
    index = np.asarray(batch["audio_index"])
    for b, t in zip(*np.nonzero(index >= 0)):
        np.testing.assert_array_equal(embeds[b, t], np.asarray(audio[b, index[b, t]]))
    np.testing.assert_array_equal(embeds[index < 0], text[index < 0])


def test_scatter_audio_uses_the_given_row():
    text = jnp.zeros((2, 3, 1))
    audio = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1)
    out = scatter_audio(text, audio, jnp.asarray([[-1, 3, 0], [2, -1, -1]]))
    assert out[..., 0].tolist() == [[0.0, 3.0, 0.0], [6.0, 0.0, 0.0]]


def test_text_only_batch_gives_the_plain_llm_logits():
    model = make_model()
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    batch["audio_index"] = jnp.full_like(batch["audio_index"], -1)
    expected = model.llm(batch["tokens"], positions=batch["positions"], input_mask=batch["input_mask"])
    np.testing.assert_array_equal(np.asarray(model(batch)), np.asarray(expected))
    text_only = {k: v for k, v in batch.items() if k not in ("audio", "audio_lens")}
    np.testing.assert_array_equal(np.asarray(model(text_only)), np.asarray(expected))


def test_oracle_audio_embeddings_reproduce_the_teacher():
    """Audio embeddings equal to the transcript's own token embeddings make student == teacher."""
    model = make_model()
    rng = np.random.default_rng(3)
    prompt, transcript, answer = (rng.integers(4, LLM.vocab_size, size=(2, n)).astype(np.int32) for n in (4, 7, 5))
    teacher = np.concatenate([prompt, transcript, answer], axis=1)
    student = teacher.copy()
    student[:, 4:11] = PLACEHOLDER
    audio_index = np.full(student.shape, -1, np.int32)
    audio_index[:, 4:11] = np.arange(7)
    positions = np.broadcast_to(np.arange(student.shape[1], dtype=np.int32), student.shape)
    mask = np.ones(student.shape, np.int32)
    batch = {
        k: jnp.asarray(v)
        for k, v in dict(
            tokens=student,
            positions=positions,
            input_mask=mask,
            audio_index=audio_index,
            teacher_tokens=teacher,
            teacher_positions=positions,
            teacher_input_mask=mask,
        ).items()
    }
    oracle = model.llm.embed(jnp.asarray(transcript))
    teacher_logits = model.llm.logits(model.teacher_hidden(batch))
    student_logits = model.llm.logits(model.student_hidden(batch, audio_embeds=oracle))
    np.testing.assert_allclose(np.asarray(student_logits), np.asarray(teacher_logits), atol=1e-6)
    # With a non-zero adapter the student (LoRA on) departs from the teacher (LoRA off).
    lora_b = model.llm.layers[0].attn.q_proj.lora_b
    lora_b[...] = jnp.full_like(lora_b[...], 0.5)
    moved = model.llm.logits(model.student_hidden(batch, audio_embeds=oracle))
    assert float(jnp.abs(moved - teacher_logits).max()) > 1e-3
    np.testing.assert_allclose(
        np.asarray(model.llm.logits(model.teacher_hidden(batch))), np.asarray(teacher_logits), atol=1e-6
    )


def _paths(state: nnx.State) -> set[str]:
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


def test_trainable_filters_pick_the_parts():
    model = make_model(encoder_lora_cfg=LoRAConfig(rank=2, targets=r"attn/(q_proj|v_proj)$"))
    _, trainable, frozen = nnx.split(model, trainable_filter(["projector", "lora"]), ...)
    paths = _paths(trainable)
    assert paths and all(p.startswith("projector/") or (p.startswith("llm/") and "/lora_" in p) for p in paths)
    assert any(p.startswith("projector/") for p in paths) and any(p.startswith("llm/") for p in paths)
    assert "encoder/embed_positions" in _paths(frozen)
    assert not _paths(trainable) & _paths(frozen)

    _, encoder_lora, _ = nnx.split(model, trainable_filter(["encoder_lora"]), ...)
    assert _paths(encoder_lora) == {f"encoder/layers/0/attn/{p}/lora_{ab}" for p in ("q_proj", "v_proj") for ab in "ab"}
    _, full, _ = nnx.split(model, trainable_filter(["encoder", "llm"]), ...)
    full_paths = _paths(full)
    assert "encoder/embed_positions" not in full_paths
    assert "encoder/conv1/kernel" in full_paths and "llm/embed_tokens/embedding" in full_paths
    assert not any(p.startswith("projector/") for p in full_paths)
    with pytest.raises(ValueError, match="trainable kinds"):
        trainable_filter(["decoder"])


def test_gradients_reach_the_projector_and_lora_only():
    model = make_model()
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(["projector", "lora"]), ...)

    def loss(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(batch)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * batch["input_mask"])

    grads = jax.jit(jax.grad(loss))(trainable)
    norms = {"/".join(map(str, p)): float(jnp.abs(v[...]).sum()) for p, v in nnx.to_flat_state(grads)}
    assert norms["projector/linear_1/kernel"] > 0
    assert norms["llm/layers/0/attn/q_proj/lora_b"] > 0


def test_bfloat16_compute_tracks_float32():
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    full = make_model()(batch)
    half = make_model(dtype=jnp.bfloat16)(batch)
    assert half.dtype == jnp.float32 and bool(jnp.isfinite(half).all())
    valid = np.asarray(batch["input_mask"], bool)
    assert np.max(np.abs(np.asarray(half) - np.asarray(full))[valid]) < 0.05


def test_pool_token_frames_merges_each_best_path_token_and_drops_blanks():
    from speechlm_jax.models.speechlm import pool_token_frames

    embeds = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1) * jnp.ones((1, 1, 2))
    # Frames: a a _ b _ b c [pad]: tokens a, b, b (a blank separates the repeat), c; frame 7 is padding.
    best = jnp.asarray([[5, 5, 0, 6, 0, 6, 7, 7]])
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]])
    pooled, valid = pool_token_frames(embeds, mask, best, blank_id=0)
    np.testing.assert_array_equal(valid, [[True, True, True, True, False, False, False, False]])
    np.testing.assert_allclose(pooled[0, :4, 0], [0.5, 3.0, 5.0, 6.0])
    np.testing.assert_allclose(pooled[0, 4:], 0.0)


def test_length_adapter_reads_the_pooled_frames_as_one_contiguous_sequence():
    """With the adapter, a row's text positions see exactly what the LLM sees when the pooled frames are
    written into the sequence without gaps: masked tail, positions recounted from the mask."""
    from speechlm_jax.models.speechlm import LengthAdapter

    model = make_model(length_adapter=LengthAdapter(blank_id=0, chunk_size=16))
    full = make_batch()
    batch = {k: jnp.asarray(v[:1]) for k, v in full.items()}
    embeds, valid = model.audio_inputs(batch)
    inputs, mask, positions = model.student_inputs(batch)
    kept = int(valid.sum())
    frames = int((batch["audio_index"] >= 0).sum())
    assert 0 < kept <= frames and int(mask.sum()) == int(batch["input_mask"].sum()) - (frames - kept)
    hidden, _ = model.llm.hidden_states(inputs, positions=positions, input_mask=mask)

    # The same row written contiguously: text, the `kept` pooled frames, text.
    real = np.asarray(mask[0]) > 0
    contiguous = inputs[:, real]
    n = contiguous.shape[1]
    reference, _ = model.llm.hidden_states(
        contiguous, positions=jnp.arange(n)[None], input_mask=jnp.ones((1, n), jnp.int32)
    )
    np.testing.assert_allclose(hidden[:, real], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(positions[0])[real], np.arange(n))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_posterior_embeddings_are_the_llm_embeddings_under_the_heads_posterior(temperature):
    """The "embeddings" output: softmax(head(norm(frame)) / T), blank excluded, times the LLM's
    input table (chunked over positions); a confident posterior gives `llm.embed` of its token."""
    from speechlm_jax.models.speechlm import LengthAdapter

    model = make_model(
        length_adapter=LengthAdapter(blank_id=0, chunk_size=3, output="embeddings", temperature=temperature)
    )
    pooled = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, LLM.hidden_size)).astype(np.float32))
    logits = model.llm.logits(model.llm.norm(pooled)).at[..., 0].set(-jnp.inf)
    table = model.llm.embed(jnp.arange(LLM.vocab_size)[None])[0]  # every token's input embedding (Gemma's scale)
    expected = jax.nn.softmax(logits / temperature, axis=-1) @ table
    np.testing.assert_allclose(model.posterior_embeddings(pooled), expected, rtol=1e-5, atol=1e-6)

    # At a low temperature the posterior is one-hot: each position is `llm.embed` of its best non-blank token.
    cold = make_model(length_adapter=LengthAdapter(blank_id=0, chunk_size=3, output="embeddings", temperature=1e-4))
    best = jnp.argmax(logits, axis=-1)
    np.testing.assert_allclose(cold.posterior_embeddings(pooled), cold.llm.embed(best), rtol=1e-4, atol=1e-5)


def test_the_learned_blank_decides_the_best_path_and_the_pad_row_does_not():
    from speechlm_jax.models.speechlm import LengthAdapter

    config = ProjectorConfig(downsample=DOWNSAMPLE, ctc_blank=True)
    model = build_speechlm(
        ENCODER, config, LLM, None, length_adapter=LengthAdapter(blank_id=0, chunk_size=4), rngs=nnx.Rngs(0)
    )
    frames = jnp.asarray(np.random.default_rng(4).normal(size=(1, 6, LLM.hidden_size)).astype(np.float32))
    assert model.ctc_blank() is not None and not bool((model.best_path(frames) == 0).all())
    # A blank vector along every frame's own direction, large: blank wins every frame.
    model.projector.ctc_blank[...] = 1e3 * jnp.mean(model.llm.norm(frames)[0], axis=0)
    assert bool((model.best_path(frames) == 0).all())
    plain = make_model(length_adapter=LengthAdapter(blank_id=0, chunk_size=4))
    assert plain.ctc_blank() is None


def test_length_adapter_off_keeps_the_batch_mask_and_positions():
    model = make_model()
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    _, mask, positions = model.student_inputs(batch)
    np.testing.assert_array_equal(mask, batch["input_mask"])
    np.testing.assert_array_equal(positions, batch["positions"])


# A 1 s encoder window (50 positions, 100 mel frames) so that audio over one window stays small.
WINDOW_HF = dict(
    num_mel_bins=80,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    max_source_positions=50,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    vocab_size=16,
    max_target_positions=8,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=1,
    begin_suppress_tokens=None,
)
WINDOW_SAMPLES = 16000


@pytest.fixture(scope="module")
def short_window_whisper(tmp_path_factory):
    """A random WhisperModel with a 1 s window, and our encoder with its weights."""
    import torch
    import transformers

    from speechlm_jax.models.hf_import import load_whisper_encoder

    torch.manual_seed(0)
    hf = transformers.WhisperModel(transformers.WhisperConfig(**WINDOW_HF)).eval()
    path = tmp_path_factory.mktemp("whisper_1s")
    hf.save_pretrained(path)
    return hf, load_whisper_encoder(path)


def test_audio_over_one_window_is_encoded_window_by_window_as_transformers_does(short_window_whisper):
    """A 2.6 s clip in a 3 s slot: windows [0, 1 s) and [1 s, 2 s) are full, [2 s, 2.6 s) partial.

    Reference: WhisperFeatureExtractor's features of the whole padded slot (one extraction,
    as Voxtral's processor), cut into 100-frame windows, each through transformers'
    WhisperEncoder; the partial window through an encoder whose window is its own valid frames.
    """
    import torch
    import transformers

    from speechlm_jax.models.frontend import encoder_frame_count, log_mel_spectrogram
    from speechlm_jax.models.speechlm import encode_windows

    hf, encoder = short_window_whisper
    slot, clip_len = 3 * WINDOW_SAMPLES, 41600
    t = np.arange(clip_len) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (150 + 200 * t) * t) + 0.05 * np.random.default_rng(1).normal(size=clip_len)
    clip = (wave * 32767).astype(np.int16)
    audio = np.zeros((2, slot), np.int16)
    audio[0, :clip_len] = clip
    audio[1, :5000] = clip[:5000]  # a second row of under one window, padded to three
    lens = np.array([clip_len, 5000], np.int32)

    mels = log_mel_spectrogram(jnp.asarray(audio), n_mels=80)
    hidden, mask = jax.jit(lambda m, n: encode_windows(encoder, m, n))(mels, jnp.asarray(lens // 160))
    assert hidden.shape == (2, 150, 32)
    assert np.asarray(mask).sum(axis=1).tolist() == [encoder_frame_count(int(n)) for n in lens]

    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=3)
    features = extractor(
        clip.astype(np.float32) / 32768.0, sampling_rate=16000, padding="max_length", max_length=slot
    ).input_features[0]
    windows = features.reshape(80, 3, 100).transpose(1, 0, 2)
    with torch.no_grad():
        full = hf.encoder(torch.from_numpy(windows[:2])).last_hidden_state.numpy().reshape(100, 32)
        short_cfg = transformers.WhisperConfig(**{**WINDOW_HF, "max_source_positions": 30})
        short = transformers.WhisperModel(short_cfg).encoder.eval()
        state = hf.encoder.state_dict()
        state["embed_positions.weight"] = state["embed_positions.weight"][:30]
        short.load_state_dict(state)
        last = short(torch.from_numpy(windows[2:, :, :60])).last_hidden_state.numpy()[0]
    reference = np.concatenate([full, last[:30]])  # 2.6 s: 260 mel frames, 130 encoder frames
    assert np.max(np.abs(np.asarray(hidden[0, :130]) - reference)) <= 1e-4
    # The short row's single valid window equals that window encoded on its own.
    alone, _ = encoder(mels[1:, :, :100], frame_mask=jnp.arange(100)[None] < 5000 // 160)
    np.testing.assert_allclose(np.asarray(hidden[1, :16]), np.asarray(alone[0, :16]), atol=1e-5)


@pytest.mark.parametrize("downsample", [2, 3])
def test_long_slots_keep_the_audio_token_count(short_window_whisper, downsample):
    """Windows are concatenated before the projector, so a slot of any length gives
    `audio_token_count` valid frames, even when the downsample factor does not divide a window."""
    _, encoder = short_window_whisper
    model = build_speechlm(encoder.config, ProjectorConfig(downsample=downsample), LLM, None, rngs=nnx.Rngs(0))
    model.encoder = encoder
    slot = int(3.5 * WINDOW_SAMPLES)
    lens = np.array([slot, 2 * WINDOW_SAMPLES, 16160, 900, 0], np.int32)
    audio = np.random.default_rng(0).integers(-5000, 5000, size=(len(lens), slot)).astype(np.int16)
    embeds, mask = jax.jit(lambda a, n: model.encode_audio(a, n))(jnp.asarray(audio), jnp.asarray(lens))
    assert embeds.shape[1] == audio_token_count(slot, downsample)
    assert np.asarray(mask).sum(axis=1).tolist() == [audio_token_count(int(n), downsample) for n in lens]
    assert bool(jnp.isfinite(embeds).all())
    # A clip's frames do not depend on how much padding follows it in its slot.
    alone, _ = model.encode_audio(jnp.asarray(audio[2:3, :16160]), jnp.asarray(lens[2:3]))
    np.testing.assert_allclose(np.asarray(embeds[2, : alone.shape[1]]), np.asarray(alone[0]), atol=1e-5)
