"""Audio files in and out: decode, mix to mono, resample to 16 kHz, keep int16.

This is the first step of the data flow (manifest / TFDS / LibriSpeech dir -> waveform):
the Grain pipeline calls `load_audio` (or `decode_audio` on stored bytes) per example and
ships int16 waveforms to the device, where `models.frontend.log_mel_spectrogram` takes over.
Unreadable inputs raise `AudioError` (a ValueError naming the source and the reason) so the
pipeline can skip the example and count the reason; nothing here retries or guesses.
"""

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """An audio source that cannot be used: missing, empty, corrupt, or outside the duration limits."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def to_int16(waveform: np.ndarray) -> np.ndarray:
    """Float waveform in [-1, 1] -> int16, rounding and clipping (the inverse of x / 32768)."""
    return np.clip(np.round(waveform * 32768.0), -32768, 32767).astype(np.int16)


def _decode(
    source: str,
    handle: str | io.BytesIO,
    sample_rate: int,
    min_seconds: float | None,
    max_seconds: float | None,
) -> np.ndarray:
    try:
        with sf.SoundFile(handle) as f:
            native_rate, num_frames = f.samplerate, f.frames
            duration = num_frames / native_rate
            if num_frames == 0:
                raise AudioError(source, "no audio frames")
            # Limits are checked from the header, before decoding anything.
            if min_seconds is not None and duration < min_seconds:
                raise AudioError(source, f"too short: {duration:.3f}s < {min_seconds}s")
            if max_seconds is not None and duration > max_seconds:
                raise AudioError(source, f"too long: {duration:.3f}s > {max_seconds}s")
            data = f.read(dtype="float32", always_2d=True)
    except sf.SoundFileError as e:
        raise AudioError(source, f"cannot decode: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(source, "no audio frames")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if native_rate != sample_rate:
        mono = soxr.resample(mono, native_rate, sample_rate)
    return to_int16(mono)


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = 16000,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Reads an audio file as mono int16 [samples] at `sample_rate`.

    Any format libsndfile reads (WAV, FLAC, OGG, MP3, ...). Channels are averaged; other
    rates are resampled with soxr (high quality). Raises AudioError if the file is missing,
    empty, undecodable, or its duration is outside [min_seconds, max_seconds].
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise AudioError(source, "missing")
    if os.path.getsize(source) == 0:
        raise AudioError(source, "empty file")
    return _decode(source, source, sample_rate, min_seconds, max_seconds)


def decode_audio(
    data: bytes,
    *,
    sample_rate: int = 16000,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    source: str = "<bytes>",
) -> np.ndarray:
    """`load_audio` for an encoded file held in memory (TFDS / ArrayRecord features)."""
    if not data:
        raise AudioError(source, "empty file")
    return _decode(source, io.BytesIO(data), sample_rate, min_seconds, max_seconds)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding); AudioError if unreadable."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise AudioError(source, "missing")
    try:
        info = sf.info(source)
    except sf.SoundFileError as e:
        raise AudioError(source, f"cannot decode: {e}") from e
    return info.frames / info.samplerate


def save_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = 16000) -> Path:
    """Writes int16 mono [samples] as 16-bit PCM; the format follows the suffix (.flac, .wav).

    The file appears atomically (written beside it, then renamed), so an interrupted run
    never leaves a truncated file that a resumed run would take as finished.
    """
    audio = np.asarray(audio)
    if audio.dtype != np.int16 or audio.ndim != 1:
        raise ValueError(f"expected int16 [samples], got {audio.dtype} {audio.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fmt = {".flac": "FLAC", ".wav": "WAV"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported audio suffix {path.suffix!r}; use .flac or .wav")
    sf.write(tmp, audio, sample_rate, format=fmt, subtype="PCM_16")
    os.replace(tmp, path)
    return path
