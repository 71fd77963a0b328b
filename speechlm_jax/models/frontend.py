"""The encoder's front end, on device: Whisper log-mel features, SpecAugment, audio token counts.

Where it sits in the data flow: the data pipeline (sources -> examples -> buckets ->
batches) ships raw int16 waveforms `[batch, samples]` to the accelerator; inside the
jitted step this module turns them into the encoder's input (encoder <- log-mel front
end), so the host only decodes audio and feature extraction runs batched next to the
encoder. `log_mel_spectrogram` reproduces transformers' `WhisperFeatureExtractor` (same
padding, window, filters, clamp and scaling) to within 1e-4, which lets a converted
Whisper checkpoint see exactly the features it was trained on. The hop length and the
rule for how many audio tokens a clip gives (`audio_token_count`) are defined here once;
the data pipeline sizes its batches with them.

Zero-padded batches. Each row is computed on its own, exactly as the extractor computes a
clip zero-padded to the batch length `L`: row `i` of a batch equals
`WhisperFeatureExtractor(...)(clip_i, padding="max_length", max_length=L)`. Compared
with the clip computed unpadded, only the boundary differs: frames whose 400-sample window
reaches past the clip's end (only the last of its `l // 160` frames, and only when
`l % 160 < 40`) see zeros instead of the reflected signal, and the clamp floor (utterance
max - 8) is taken over the padded row, which adds the frames straddling the clip's end.
The encoder's valid frames are the first `l // 160` (see `audio_token_count`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

LOG_FLOOR = 1e-10  # Whisper's power floor before log10.
DYNAMIC_RANGE = 8.0  # log10 units kept below each utterance's maximum.
_CPU_FRAMES_PER_STEP = 2048  # frames per lax.map step on CPU: ~3 MB of frames, cache-sized.


HOP_LENGTH = 160  # samples per log-mel frame at 16 kHz


def mel_frame_count(num_samples: int) -> int:
    """Log-mel frames of a clip of `num_samples` 16 kHz samples: one per hop."""
    return num_samples // HOP_LENGTH


def encoder_frames_of_mel(mel_frames: int) -> int:
    """Whisper encoder frames of `mel_frames` log-mel frames: its stride-2 conv halves them, rounding up."""
    return (mel_frames + 1) // 2


def encoder_frame_count(num_samples: int) -> int:
    """Whisper encoder frames of a clip of `num_samples` samples."""
    return encoder_frames_of_mel(mel_frame_count(num_samples))


def audio_token_count(num_samples: int, downsample: int) -> int:
    """Valid projector frames for a clip of `num_samples` 16 kHz samples.

    log-mel frames = samples // HOP_LENGTH; the Whisper encoder's stride-2 conv gives
    (frames + 1) // 2; the projector keeps one frame in `downsample`.
    """
    return encoder_frame_count(num_samples) // downsample


@functools.cache
def mel_filters(n_mels: int, n_fft: int = 400, sample_rate: int = 16000) -> np.ndarray:
    """librosa's Slaney mel filterbank over 0..sample_rate/2, as `[n_fft // 2 + 1, n_mels]` float32.

    This is the matrix WhisperFeatureExtractor builds with `mel_filter_bank(norm="slaney",
    mel_scale="slaney")`; it is computed in float64 and rounded once.
    """
    bank = librosa.filters.mel(
        sr=sample_rate,
        n_fft=n_fft,
        n_mels=n_mels,
        fmin=0.0,
        fmax=sample_rate / 2,
        htk=False,
        norm="slaney",
        dtype=np.float64,
    )
    return np.ascontiguousarray(bank.T, dtype=np.float32)


@functools.cache
def _periodic_hann(n_fft: int) -> np.ndarray:
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


def _frames(waveform: jax.Array, n_fft: int, hop_length: int) -> jax.Array:
    """Centered frames with reflect padding, dropping the final frame as Whisper does.

    waveform [batch, samples] -> [batch, samples // hop_length, n_fft]. Built from
    hop-sized chunks with reshapes and slices instead of a gather, which XLA lowers to
    plain copies.
    """
    batch, num_samples = waveform.shape
    num_frames = num_samples // hop_length
    pad = n_fft // 2
    padded = jnp.pad(waveform, ((0, 0), (pad, pad)), mode="reflect")
    chunks_per_frame = -(-n_fft // hop_length)
    num_chunks = num_frames + chunks_per_frame - 1
    chunks = padded[:, : num_chunks * hop_length].reshape(batch, num_chunks, hop_length)
    pieces = [chunks[:, i : i + num_frames] for i in range(chunks_per_frame)]
    return jnp.concatenate(pieces, axis=-1)[..., :n_fft]


def _mel_power(audio: jax.Array, n_mels: int, n_fft: int, hop_length: int, sample_rate: int) -> jax.Array:
    """Mel power of a few rows: audio [rows, samples] -> [rows, samples // hop_length, n_mels]."""
    if jnp.issubdtype(audio.dtype, jnp.integer):
        waveform = audio.astype(jnp.float32) / 32768.0
    else:
        waveform = audio.astype(jnp.float32)
    frames = _frames(waveform, n_fft, hop_length) * _periodic_hann(n_fft)
    spectrum = jnp.fft.rfft(frames, axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    return jnp.einsum(
        "btf,fm->btm",
        power,
        mel_filters(n_mels, n_fft, sample_rate),
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.partial(jax.jit, static_argnames=("n_mels", "n_fft", "hop_length", "sample_rate"))
def log_mel_spectrogram(
    audio: jax.Array,
    *,
    n_mels: int = 80,
    n_fft: int = 400,
    hop_length: int = HOP_LENGTH,
    sample_rate: int = 16000,
) -> jax.Array:
    """Whisper log-mel features of a batch of waveforms.

    audio: [batch, samples] int16 (scaled by 1/32768) or float in [-1, 1], with
    samples > n_fft // 2 (reflect padding needs them).
    Returns float32 [batch, n_mels, samples // hop_length]: periodic-Hann STFT with
    reflect centering, power spectrum, Slaney mel filters, log10(max(x, 1e-10)), floor at
    each utterance's max - 8, then (x + 4) / 4.
    """
    batch, num_samples = audio.shape
    if num_samples <= n_fft // 2:
        raise ValueError(f"need more than {n_fft // 2} samples per row, got {num_samples}")
    num_frames = num_samples // hop_length
    mel_power = functools.partial(
        _mel_power, n_mels=n_mels, n_fft=n_fft, hop_length=hop_length, sample_rate=sample_rate
    )
    batch_spec = jax.typeof(audio).sharding.spec
    explicitly_sharded = bool(batch_spec) and batch_spec[0] is not None
    if jax.default_backend() == "cpu" and not explicitly_sharded:
        # On CPU the cost is memory traffic: frames and spectra of the whole batch are
        # hundreds of MB. A few rows at a time stay in cache and run 2-5x faster.
        # (lax.map cannot scan an axis with an explicit sharding; such batches take the
        # vectorised path.)
        rows = max(1, min(batch, _CPU_FRAMES_PER_STEP // max(num_frames, 1)))
        mel = jax.lax.map(lambda row: mel_power(row[None])[0], audio, batch_size=rows)
    else:
        mel = mel_power(audio)
    log_mel = jnp.log10(jnp.maximum(mel, LOG_FLOOR))
    floor = jnp.max(log_mel, axis=(1, 2), keepdims=True) - DYNAMIC_RANGE
    return jnp.swapaxes((jnp.maximum(log_mel, floor) + 4.0) / 4.0, 1, 2)


@functools.partial(
    jax.jit,
    static_argnames=("freq_masks", "freq_width", "time_masks", "time_width", "mask_value"),
)
def spec_augment(
    mels: jax.Array,
    rng: jax.Array,
    *,
    freq_masks: int,
    freq_width: int,
    time_masks: int,
    time_width: int,
    lengths: jax.Array | None = None,
    mask_value: str = "mean",
) -> jax.Array:
    """SpecAugment frequency and time masking (Park et al., 2019), without time warping.

    mels: [batch, n_mels, frames]; rng: a jax PRNG key; lengths: [batch] valid frames per
    utterance (default: all frames). Each utterance gets `freq_masks` bands of width
    uniform in [0, freq_width] and `time_masks` spans of width uniform in
    [0, min(time_width, length)], placed uniformly inside the valid frames, so padding
    frames are never the target of a mask and stay unchanged.
    mask_value: "mean" fills masked cells with the utterance's mean over its valid frames
    (a neutral value for Whisper's normalised log-mel, whose silence is not 0); "zero"
    fills with 0. Returns [batch, n_mels, frames].
    """
    if mask_value not in ("mean", "zero"):
        raise ValueError(f"mask_value must be 'mean' or 'zero', got {mask_value!r}")
    batch, n_mels, num_frames = mels.shape
    if lengths is None:
        lengths = jnp.full((batch,), num_frames, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    # One draw for all masks: (width, start) fractions per mask. A single PRNG call keeps
    # the compiled program small (each jax.random call adds its own threefry kernel).
    draws = jax.random.uniform(rng, (batch, freq_masks + time_masks, 2))

    def spans(draw, max_width, extent, size):
        # draw [batch, masks, 2]; extent [batch]: the range the masks may cover.
        # Returns a [batch, size] boolean hit map.
        width = jnp.floor(draw[..., 0] * (max_width + 1)).astype(jnp.int32)
        width = jnp.minimum(width, extent[:, None])
        start = jnp.floor(draw[..., 1] * (extent[:, None] - width + 1)).astype(jnp.int32)
        pos = jnp.arange(size)[None, None, :]
        hit = (pos >= start[..., None]) & (pos < (start + width)[..., None])
        return jnp.any(hit, axis=1)

    freq_hit = spans(draws[:, :freq_masks], freq_width, jnp.full((batch,), n_mels), n_mels)
    time_hit = spans(draws[:, freq_masks:], time_width, lengths, num_frames)
    valid = jnp.arange(num_frames)[None, :] < lengths[:, None]
    hit = (freq_hit[:, :, None] | time_hit[:, None, :]) & valid[:, None, :]
    if mask_value == "mean":
        total = jnp.sum(jnp.where(valid[:, None, :], mels, 0.0), axis=(1, 2))
        fill = total / jnp.maximum(lengths * n_mels, 1)
    else:
        fill = jnp.zeros((batch,), mels.dtype)
    return jnp.where(hit, fill[:, None, None].astype(mels.dtype), mels)


@dataclasses.dataclass(frozen=True)
class SpecAugment:
    """SpecAugment's policy for training (`model.spec_augment`): masks per utterance and their widths.

    `rows(mels, lengths, seeds)` masks each utterance with its own seed (one int per row, drawn
    by the train step from its rng), so a row's masks do not depend on the rows beside it: a
    batch split into microbatches is masked exactly as it is whole.
    """

    freq_masks: int = 0
    freq_width: int = 27
    time_masks: int = 0
    time_width: int = 100

    @property
    def enabled(self) -> bool:
        return (self.freq_masks > 0 and self.freq_width > 0) or (self.time_masks > 0 and self.time_width > 0)

    def rows(self, mels: jax.Array, lengths: jax.Array, seeds: jax.Array) -> jax.Array:
        """mels [N, n_mels, M], lengths [N] valid frames, seeds [N] int -> masked mels [N, n_mels, M]."""
        policy = dataclasses.asdict(self)

        def one(m: jax.Array, length: jax.Array, seed: jax.Array) -> jax.Array:
            return spec_augment(m[None], jax.random.key(seed), lengths=length[None], **policy)[0]

        return jax.vmap(one)(mels, lengths, seeds)
