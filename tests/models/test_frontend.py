"""log_mel_spectrogram against transformers' WhisperFeatureExtractor and librosa's filters."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from speechlm_jax.models.frontend import (
    audio_token_count,
    log_mel_spectrogram,
    mel_filters,
    spec_augment,
)
from speechlm_jax.sharding import batch_sharding, make_mesh

SR = 16000


def _speechlike(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Noise under a syllable-rate envelope plus a gliding tone: broadband with quiet parts."""
    t = np.arange(num_samples) / SR
    envelope = 0.05 + 0.3 * np.abs(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, np.pi)))
    glide = 0.2 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    return (rng.standard_normal(num_samples) * 0.1 * envelope + glide * envelope).astype(np.float32)


def _whisper(n_mels: int, clips: list[np.ndarray], max_length: int) -> np.ndarray:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(
        clips, sampling_rate=SR, padding="max_length", max_length=max_length, return_tensors="np"
    ).input_features


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_librosa_and_whisper(n_mels):
    ours = mel_filters(n_mels)
    assert ours.shape == (201, n_mels)
    lib = librosa.filters.mel(sr=SR, n_fft=400, n_mels=n_mels, fmin=0, fmax=8000, htk=False, norm="slaney")
    np.testing.assert_allclose(ours, lib.T, rtol=1e-6, atol=1e-9)
    hf = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SR,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_padded_batch_matches_whisper_feature_extractor(n_mels, dtype):
    rng = np.random.default_rng(n_mels)
    lengths = [SR * 2 + 37, SR + 123, 8000]
    max_len = max(lengths)
    clips = [_speechlike(rng, n) for n in lengths]
    if dtype == "int16":
        clips = [np.round(c * 32767).astype(np.int16) for c in clips]
    batch = np.zeros((len(clips), max_len), clips[0].dtype)
    for row, clip in zip(batch, clips):
        row[: len(clip)] = clip
    ours = np.asarray(log_mel_spectrogram(jnp.asarray(batch), n_mels=n_mels))
    as_float = [c.astype(np.float32) / 32768.0 if dtype == "int16" else c for c in clips]
    reference = _whisper(n_mels, as_float, max_len)
    assert ours.shape == (3, n_mels, max_len // 160) == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_padded_row_matches_unpadded_clip_except_the_boundary_frame():
    rng = np.random.default_rng(1)
    length = SR + 20  # length % 160 < 40: the last valid frame's window reaches the padding
    clip = _speechlike(rng, length)
    padded = np.zeros((1, 3 * SR), np.float32)
    padded[0, :length] = clip
    ours = np.asarray(log_mel_spectrogram(jnp.asarray(padded)))[0, :, : length // 160]
    alone = WhisperFeatureExtractor(feature_size=80)(
        clip, sampling_rate=SR, padding="longest", return_tensors="np"
    ).input_features[0]
    assert alone.shape == ours.shape
    np.testing.assert_allclose(ours[:, :-1], alone[:, :-1], atol=1e-4, rtol=0)
    assert np.abs(ours[:, -1] - alone[:, -1]).max() > 1e-4


def test_jit_with_batch_sharded_over_an_explicit_mesh():
    rng = np.random.default_rng(2)
    audio = np.stack([_speechlike(rng, SR) for _ in range(8)])
    expected = np.asarray(log_mel_spectrogram(jnp.asarray(audio)))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = jax.device_put(audio, NamedSharding(mesh, PartitionSpec("data")))
    got = jax.jit(lambda a: log_mel_spectrogram(a) * 1.0)(sharded)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_audio_token_count_matches_frames():
    for num_samples, downsample, expected in [
        (160000, 1, 500),
        (160000, 4, 125),
        (16159, 2, 25),
        (159, 1, 0),
    ]:
        assert audio_token_count(num_samples, downsample) == expected
    audio = jnp.zeros((1, 16000 + 333), jnp.int16)
    frames = log_mel_spectrogram(audio).shape[-1]
    assert audio_token_count(16000 + 333, 1) == (frames + 1) // 2


def test_spec_augment_masks_inside_valid_frames():
    rng = np.random.default_rng(3)
    mels = jnp.asarray(rng.standard_normal((4, 80, 200)).astype(np.float32))
    lengths = jnp.asarray([200, 150, 60, 10])
    key = jax.random.key(0)
    kwargs = dict(freq_masks=2, freq_width=10, time_masks=2, time_width=30, lengths=lengths)
    out = np.asarray(spec_augment(mels, key, **kwargs))
    again = np.asarray(spec_augment(mels, key, **kwargs))
    np.testing.assert_array_equal(out, again)
    changed = out != np.asarray(mels)
    for i, n in enumerate(np.asarray(lengths)):
        assert not changed[i, :, n:].any()
        valid = np.asarray(mels)[i, :, :n]
        filled = out[i, :, :n][changed[i, :, :n]]
        np.testing.assert_allclose(filled, valid.mean(), rtol=1e-5, atol=1e-6)
        # Every changed cell lies in a masked band (full time extent) or a masked span.
        band = changed[i, :, :n].all(axis=1)
        span = changed[i, :, :n].all(axis=0)
        assert band.sum() <= 2 * 10 and span.sum() <= 2 * 30
        np.testing.assert_array_equal(changed[i, :, :n], band[:, None] | span[None, :])
    assert changed.any()
    zero = np.asarray(spec_augment(mels, key, mask_value="zero", **kwargs))
    np.testing.assert_array_equal(zero[changed], 0.0)


def test_spec_augment_zero_width_is_identity():
    mels = jnp.ones((2, 80, 50))
    out = spec_augment(mels, jax.random.key(1), freq_masks=3, freq_width=0, time_masks=3, time_width=0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mels))


def test_jit_with_batch_sharded_over_an_auto_mesh():
    rng = np.random.default_rng(4)
    audio = np.stack([_speechlike(rng, SR) for _ in range(8)])
    expected = np.asarray(log_mel_spectrogram(jnp.asarray(audio)))
    sharded = jax.device_put(audio, batch_sharding(make_mesh({"data": -1}), 2))
    np.testing.assert_allclose(np.asarray(jax.jit(log_mel_spectrogram)(sharded)), expected, atol=1e-6)
