"""Whisper encoder vs transformers' WhisperEncoder: full window, short windows, padding masks, LoRA, presets."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from speechlm_jax.models.hf_import import load_whisper_encoder
from speechlm_jax.models.lora import LoRAConfig, apply_lora
from speechlm_jax.models.presets import WHISPER_PRESETS
from speechlm_jax.models.whisper import WhisperConfig, WhisperEncoder, encoder_frames, sinusoids

TINY = dict(
    num_mel_bins=80,
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=128,
    vocab_size=100,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=1,
    begin_suppress_tokens=None,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny WhisperModel saved with save_pretrained, and the torch model itself."""
    torch.manual_seed(0)
    model = transformers.WhisperModel(transformers.WhisperConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("whisper_tiny")
    model.save_pretrained(path)
    return path, model


def hf_encoder(
    model: transformers.WhisperModel, frames: int
) -> transformers.models.whisper.modeling_whisper.WhisperEncoder:
    """The same encoder weights in an HF encoder whose window is `frames` mel frames.

    HF's WhisperEncoder refuses inputs shorter than 2 * max_source_positions, so for a
    short window we rebuild it with max_source_positions = frames // 2 and keep the first
    frames // 2 rows of the (fixed sinusoid) position table, which is exactly what our
    encoder uses for a short window.
    """
    if frames == 2 * model.config.max_source_positions:
        return model.encoder
    config = transformers.WhisperConfig(**{**TINY, "max_source_positions": frames // 2})
    short = transformers.WhisperModel(config).encoder.eval()
    state = model.encoder.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][: frames // 2]
    short.load_state_dict(state)
    return short


def hf_hidden(model: transformers.WhisperModel, mels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_encoder(model, mels.shape[-1])(torch.from_numpy(mels)).last_hidden_state.numpy()


def random_mels(batch: int, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 80, frames)).astype(np.float32)


def test_config_round_trip():
    hf = transformers.WhisperConfig(**TINY)
    ours = WhisperConfig.from_hf(hf)
    assert ours == WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    assert WhisperConfig.from_hf(transformers.WhisperConfig(**ours.to_hf())) == ours
    assert WhisperConfig.from_hf(hf.to_dict()) == ours


def test_position_table(checkpoint):
    """Our default table is the exact sinusoid; HF's float32 one drifts by ~1e-4 at late rows,
    which is why the import takes the checkpoint's own table."""
    path, model = checkpoint
    hf_table = model.encoder.embed_positions.weight.detach().numpy()
    np.testing.assert_allclose(sinusoids(1500, 64), hf_table, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(load_whisper_encoder(path).embed_positions[...]), hf_table)


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_full_window_matches_hf(checkpoint, attention):
    path, model = checkpoint
    encoder = load_whisper_encoder(path, attention=attention)
    mels = random_mels(2, 3000)
    hidden, mask = encoder(jnp.asarray(mels))
    assert hidden.shape == (2, 1500, 64) and bool(mask.all())
    assert np.max(np.abs(np.asarray(hidden) - hf_hidden(model, mels))) <= 1e-4


@pytest.mark.parametrize("frames", [400, 128])
def test_short_window_matches_hf(checkpoint, frames):
    path, model = checkpoint
    encoder = load_whisper_encoder(path)
    mels = random_mels(1, frames, seed=frames)
    hidden, _ = jax.jit(lambda m: encoder(m))(jnp.asarray(mels))
    assert hidden.shape == (1, frames // 2, 64)
    assert np.max(np.abs(np.asarray(hidden) - hf_hidden(model, mels))) <= 1e-4


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_padding_mask_keeps_valid_frames_of_each_clip(checkpoint, attention):
    path, model = checkpoint
    encoder = load_whisper_encoder(path, attention=attention)
    window, lengths = 400, [400, 256, 131]
    clips = [random_mels(1, n, seed=n) for n in lengths]
    # Padded frames hold garbage on purpose: the mask alone must keep it out.
    batch = random_mels(len(lengths), window, seed=99)
    for i, clip in enumerate(clips):
        batch[i, :, : clip.shape[-1]] = clip[0]
    frame_mask = (np.arange(window)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    hidden, mask = jax.jit(lambda m, f: encoder(m, frame_mask=f))(jnp.asarray(batch), jnp.asarray(frame_mask))
    assert hidden.shape == (3, 200, 64)
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), [encoder_frames(n) for n in lengths])
    for i, (n, clip) in enumerate(zip(lengths, clips)):
        valid = encoder_frames(n)
        alone, _ = encoder(jnp.asarray(clip))
        np.testing.assert_allclose(np.asarray(hidden[i, :valid]), np.asarray(alone[0]), atol=1e-5)
        if n % 2 == 0:
            assert np.max(np.abs(np.asarray(hidden[i, :valid]) - hf_hidden(model, clip)[0])) <= 1e-4


def test_dot_product_attention_equals_einsum_with_padding():
    """The padding mask through jax.nn.dot_product_attention: outputs and gradients equal the einsum's."""
    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64)
    mels = jnp.asarray(random_mels(3, 40))
    frame_mask = jnp.asarray((np.arange(40)[None, :] < np.array([[40], [23], [0]])).astype(np.int32))

    def run(attention: str):
        encoder = WhisperEncoder(dataclasses.replace(config, attention=attention), rngs=nnx.Rngs(0))

        def loss(encoder: WhisperEncoder) -> tuple[jax.Array, jax.Array]:
            hidden, mask = encoder(mels, frame_mask=frame_mask)
            return jnp.sum(jnp.sin(hidden) * mask[..., None]), hidden

        (_, hidden), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(encoder)
        return hidden, grads

    ref_hidden, ref_grads = run("einsum")
    hidden, grads = run("dot_product")
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(1.0, float(np.abs(b).max())))


def test_fully_padded_row_is_finite():
    encoder = WhisperEncoder(
        WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64), rngs=nnx.Rngs(0)
    )
    hidden, mask = encoder(jnp.asarray(random_mels(2, 20)), frame_mask=jnp.asarray([[1] * 20, [0] * 20]))
    assert bool(jnp.isfinite(hidden).all())
    assert mask.sum(axis=1).tolist() == [10, 0]


def test_lora_on_encoder_projections():
    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
    encoder = WhisperEncoder(config, rngs=nnx.Rngs(0))
    hits = apply_lora(encoder, LoRAConfig(rank=4, targets=r"attn/(q_proj|v_proj)$"), rngs=nnx.Rngs(1))
    assert hits == [f"layers/{i}/attn/{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    mels = jnp.asarray(random_mels(1, 40))
    base, _ = encoder(mels, lora=False)
    np.testing.assert_allclose(np.asarray(encoder(mels)[0]), np.asarray(base), atol=1e-6)
    encoder.layers[0].attn.q_proj.lora_b[...] = jnp.ones_like(encoder.layers[0].attn.q_proj.lora_b[...])
    assert float(jnp.abs(encoder(mels)[0] - base).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(encoder(mels, lora=False)[0]), np.asarray(base), atol=1e-6)


def test_rejects_windows_longer_than_the_position_table():
    encoder = WhisperEncoder(
        WhisperConfig(
            d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, max_source_positions=10
        ),
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match="exceed"):
        encoder(jnp.zeros((1, 80, 22)))


@pytest.mark.parametrize("name", sorted(WHISPER_PRESETS))
def test_preset_parameter_count_matches_transformers(name):
    """Each preset's encoder has exactly the parameters of transformers' encoder (built on meta)."""
    preset = WHISPER_PRESETS[name]
    with torch.device("meta"):
        reference = transformers.WhisperModel(transformers.WhisperConfig(**preset)).encoder
    config = WhisperConfig.from_hf(preset)
    abstract = nnx.eval_shape(lambda: WhisperEncoder(config, rngs=nnx.Rngs(0)))
    ours = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract)))
    assert ours == sum(p.numel() for p in reference.parameters())


def test_presets_name_the_released_shapes():
    assert set(WHISPER_PRESETS) == {
        "whisper-tiny",
        "whisper-base",
        "whisper-small",
        "whisper-medium",
        "whisper-large-v3",
    }
    assert WhisperConfig.from_hf(WHISPER_PRESETS["whisper-large-v3"]).num_mel_bins == 128


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_scanned_layers_equal_unrolled(checkpoint, attention):
    """The imported encoder as one scanned layer over stacked weights, with a padding mask and
    LoRA on, gives the unrolled outputs; its export writes the same tensors."""
    path, _ = checkpoint
    unrolled = load_whisper_encoder(path)
    scanned = load_whisper_encoder(path, scan_layers=True, attention=attention)
    assert scanned.layers.attn.q_proj.kernel.shape == (2, 64, 64)
    mels = jnp.asarray(random_mels(2, 400, seed=5))
    frame_mask = jnp.asarray((np.arange(400)[None, :] < np.array([[400], [151]])).astype(np.int32))
    reference, _ = unrolled(mels, frame_mask=frame_mask)
    hidden, mask = jax.jit(lambda m, f: scanned(m, frame_mask=f))(mels, frame_mask)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(reference), atol=1e-6 * float(jnp.abs(reference).max()))
    assert np.asarray(mask).sum(axis=1).tolist() == [200, 76]

    hits = apply_lora(scanned, LoRAConfig(rank=2, targets=r"attn/q_proj$"), rngs=nnx.Rngs(1))
    assert hits == ["layers/attn/q_proj"] and scanned.layers.attn.q_proj.lora_a.shape == (2, 64, 2)
    np.testing.assert_allclose(np.asarray(scanned(mels)[0]), np.asarray(unrolled(mels)[0]), atol=1e-5)
