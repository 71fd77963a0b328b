"""Conversion fixtures: a tiny 'trained' SpeechLM (random weights everywhere, adapters non-zero),
its word tokenizer, a test clip and prompt, and loading the exported Voxtral.

The encoder window is 100 positions (200 mel frames = 2 s), so the Voxtral reference,
which always runs a full window, stays fast; the projector stacks 4 frames (encoder_ffn_dim
= 4 * d_model, as Voxtral requires), giving 25 audio tokens per clip.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from speechlm_jax.models.llm import LLMConfig
from speechlm_jax.models.lora import LoRAConfig
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import SpeechLM, build_speechlm
from speechlm_jax.models.whisper import WhisperConfig

SAMPLES = 32000  # 2 s at 16 kHz: one full encoder window
AUDIO_TOKENS = 25
WORDS = "what did the speaker say about the red cat and the blue dog please answer briefly"

ENCODER = WhisperConfig(
    num_mel_bins=80,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    max_source_positions=100,
)


def _llm_config(family: str = "llama", *, tied: bool = False) -> LLMConfig:
    fields = dict(
        model_type=family,
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_theta=10000.0,
    )
    return LLMConfig.from_hf(fields)


def _randomise(model: nnx.Module, seed: int) -> None:
    """Every parameter random (norms and biases too, adapters' B non-zero), so a mapping slip shows."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = str(path[-1])
        value = variable.get_value()
        if name == "scale":
            new = 1.0 + 0.1 * rng.normal(size=value.shape)
        elif name in ("bias", "lora_b"):
            new = 0.1 * rng.normal(size=value.shape)
        elif name == "embedding" or "lm_head" in [str(p) for p in path]:
            # Large token scores so that greedy decoding of a random model varies its tokens.
            new = rng.normal(size=value.shape)
        else:
            continue
        variable.set_value(jnp.asarray(new, value.dtype))


@pytest.fixture(scope="session")
def tiny_speechlm():
    """`tiny_speechlm(family="llama", *, tied=False, lora=True, projector=None, seed=0)`: a new
    random SpeechLM each call (rank-4 LoRA on every linear unless `lora=False`)."""

    def make(
        family: str = "llama",
        *,
        tied: bool = False,
        lora: bool = True,
        projector: ProjectorConfig | None = None,
        seed: int = 0,
    ) -> SpeechLM:
        model = build_speechlm(
            ENCODER,
            projector or ProjectorConfig(kind="frame_stack", downsample=4),
            _llm_config(family, tied=tied),
            LoRAConfig(rank=4, alpha=8.0) if lora else None,
            rngs=nnx.Rngs(seed),
        )
        _randomise(model, seed)
        return model

    return make


@pytest.fixture(scope="session")
def tokenizer_words() -> str:
    """The words of the tiny models' tokenizer (its vocabulary fits their 48 embeddings)."""
    return WORDS


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer_words):
    """`tokenizer_dir(tmp_path)`: the word tokenizer saved in `tmp_path / "tokenizer"`, its folder returned."""

    def make(tmp_path: Path) -> Path:
        return build_word_tokenizer([tokenizer_words], tmp_path / "tokenizer")

    return make


@pytest.fixture(scope="session")
def clip() -> np.ndarray:
    """[SAMPLES] int16: a chirp plus noise."""
    t = np.arange(SAMPLES) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * np.random.default_rng(0).normal(size=SAMPLES)
    return (wave * 32767).astype(np.int16)


@pytest.fixture(scope="session")
def prompt_batch():
    """`prompt_batch(tokenizer, clip)`: one example, `<bos> what did the speaker say <audio x 25>
    please answer`, as our model's batch."""

    def make(tokenizer: Path, clip: np.ndarray) -> dict[str, jax.Array]:
        tok = load_tokenizer(str(tokenizer))
        before = [tok.bos_id] + tok.encode("what did the speaker say")
        after = tok.encode("please answer")
        tokens = before + [tok.audio_token_id] * AUDIO_TOKENS + after
        audio_index = [-1] * len(before) + list(range(AUDIO_TOKENS)) + [-1] * len(after)
        t = len(tokens)
        return dict(
            audio=jnp.asarray(clip[None, None]),
            audio_lens=jnp.asarray([[SAMPLES]], jnp.int32),
            tokens=jnp.asarray([tokens], jnp.int32),
            positions=jnp.arange(t, dtype=jnp.int32)[None],
            input_mask=jnp.ones((1, t), jnp.int32),
            audio_index=jnp.asarray([audio_index], jnp.int32),
        )

    return make


@pytest.fixture(scope="session")
def hf_inputs():
    """`hf_inputs(folder, batch, clip)`: the same audio + prompt for the HF class, features from
    the exported feature extractor."""

    def make(folder, batch, clip) -> dict[str, torch.Tensor]:
        extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
        features = extractor(clip.astype(np.float32) / 32768.0, sampling_rate=16000, return_tensors="pt").input_features
        tokens = torch.tensor(np.asarray(batch["tokens"]))
        return dict(input_ids=tokens, input_features=features, attention_mask=torch.ones_like(tokens))

    return make


@pytest.fixture(scope="session")
def load_voxtral():
    """`load_voxtral(folder, **kwargs)`: the exported VoxtralForConditionalGeneration, every
    tensor loaded (none missing or unexpected), in eval mode."""

    def load(folder, **kwargs) -> transformers.VoxtralForConditionalGeneration:
        model, info = transformers.VoxtralForConditionalGeneration.from_pretrained(
            folder, output_loading_info=True, **kwargs
        )
        assert not any(info.values()), info
        return model.eval()

    return load
