"""Audio files in and out: decode, mix to mono, resample to 16 kHz, keep int16.

This is the first step of the data flow (manifest / TFDS / LibriSpeech dir -> waveform):
the Grain pipeline calls `load_audio` (or `decode_audio` on stored bytes) per example and
ships int16 waveforms to the device, where `models.frontend.log_mel_spectrogram` takes over.
Unreadable inputs raise `AudioError` (a ValueError naming the source and the reason) so the
pipeline can skip the example and count it under its `cause`; nothing here retries or guesses.

The causes, each a skip counter of the pipeline (`skipped/<cause>`):

    missing_file   no file at the path
    unreadable     the file exists but cannot be opened (permissions, I/O error)
    empty_file     zero bytes
    undecodable    not audio libsndfile can open (random bytes, an unknown format, a cut-off header)
    truncated      the header opens but the stream ends early: a WAV whose data chunk is shorter
                   than its header says, a FLAC or OGG whose decoding fails after the header
    empty_audio    a valid file of zero samples
    too_short      shorter than `min_seconds` (the header's duration)
    too_long       longer than `max_seconds`
"""

import dataclasses
import io
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from speechlm_jax import storage

AUDIO_CAUSES = (
    "missing_file",
    "unreadable",
    "empty_file",
    "undecodable",
    "truncated",
    "empty_audio",
    "too_short",
    "too_long",
)


class AudioError(ValueError):
    """An audio source that cannot be used: missing, empty, corrupt, or outside the duration limits.

    `reason` is the message for a person; `cause` one of `AUDIO_CAUSES`, the skip counter.
    """

    def __init__(self, source: str, reason: str, cause: str):
        if cause not in AUDIO_CAUSES:
            raise ValueError(f"unknown audio error cause {cause!r}; known: {AUDIO_CAUSES}")
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.cause = cause


def to_int16(waveform: np.ndarray) -> np.ndarray:
    """Float waveform in [-1, 1] -> int16, rounding and clipping (the inverse of x / 32768)."""
    return np.clip(np.round(waveform * 32768.0), -32768, 32767).astype(np.int16)


def _wav_shortfall(head: bytes, size: int) -> tuple[int, int] | None:
    """(bytes the data chunk declares, bytes the file holds after its start) when a RIFF/WAVE
    file's data chunk is cut short, else None.

    libsndfile quietly shortens such a file to the frames present, so a WAV cut off by an
    interrupted copy would otherwise read as a shorter clip. Streaming writers that leave
    the size 0 or 0xFFFFFFFF (unknown) are not flagged.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(head):
        chunk, length = head[offset : offset + 4], struct.unpack("<I", head[offset + 4 : offset + 8])[0]
        if chunk == b"data":
            present = size - (offset + 8)
            return (length, present) if 0 < length < 0xFFFFFFFF and length > present else None
        offset += 8 + length + (length & 1)
    return None


_HEAD_BYTES = 65536  # enough for the chunks a WAV has before its data


def _check_container(source: str, head: bytes, size: int) -> None:
    """The checks libsndfile does not make: an empty file, a WAV cut short."""
    if size == 0:
        raise AudioError(source, "empty file", "empty_file")
    shortfall = _wav_shortfall(head, size)
    if shortfall is not None:
        declared, present = shortfall
        raise AudioError(
            source, f"truncated: the WAV data chunk declares {declared} bytes, the file holds {present}", "truncated"
        )


# A segment may end this much after the file does (Lhotse's default tolerance for a duration
# rounded in the manifest); the frames present are read.
SEGMENT_TOLERANCE_S = 0.025


@dataclasses.dataclass(frozen=True)
class AudioSegment:
    """A part of a longer recording: `duration` seconds (None: to the end) from `offset`, and
    optionally one channel of it (None: the channels averaged).

    Lhotse cuts and NeMo lines with an offset name their audio this way.
    """

    offset: float = 0.0
    duration: float | None = None
    channel: int | None = None

    def frames(self, source: str, rate: int, total: int) -> tuple[int, int]:
        """(first frame, number of frames) of the segment in a file of `total` frames at `rate`."""
        start = round(self.offset * rate)
        if start >= total:
            raise AudioError(
                source,
                f"truncated: the segment starts at {self.offset:.3f}s, the file ends at {total / rate:.3f}s",
                "truncated",
            )
        if self.duration is None:
            return start, total - start
        count = round(self.duration * rate)
        if start + count > total + round(SEGMENT_TOLERANCE_S * rate):
            end = self.offset + self.duration
            raise AudioError(
                source, f"truncated: the segment ends at {end:.3f}s, the file at {total / rate:.3f}s", "truncated"
            )
        return start, min(count, total - start)


def _decode(
    source: str,
    handle: str | io.BytesIO,
    sample_rate: int,
    min_seconds: float | None,
    max_seconds: float | None,
    segment: AudioSegment | None = None,
) -> np.ndarray:
    try:
        f = sf.SoundFile(handle)
    except sf.SoundFileError as e:
        raise AudioError(source, f"cannot decode: {e}", "undecodable") from e
    with f:
        native_rate, num_frames = f.samplerate, f.frames
        if num_frames == 0:
            raise AudioError(source, "no audio frames", "empty_audio")
        start, num_frames = (0, num_frames) if segment is None else segment.frames(source, native_rate, num_frames)
        duration = num_frames / native_rate
        # Limits are checked from the header, before decoding anything.
        if min_seconds is not None and duration < min_seconds:
            raise AudioError(source, f"too short: {duration:.3f}s < {min_seconds}s", "too_short")
        if max_seconds is not None and duration > max_seconds:
            raise AudioError(source, f"too long: {duration:.3f}s > {max_seconds}s", "too_long")
        try:
            if start:
                f.seek(start)
            data = f.read(num_frames if segment is not None else -1, dtype="float32", always_2d=True)
        except sf.SoundFileError as e:
            raise AudioError(source, f"truncated: decoding stopped after the header: {e}", "truncated") from e
    if data.shape[0] == 0:
        raise AudioError(source, "truncated: no audio frames after the header", "truncated")
    if segment is not None and data.shape[0] < num_frames:
        raise AudioError(source, f"truncated: {data.shape[0]} of the segment's {num_frames} frames decode", "truncated")
    if segment is not None and segment.channel is not None:
        if not 0 <= segment.channel < data.shape[1]:
            raise AudioError(source, f"no channel {segment.channel} in {data.shape[1]}-channel audio", "undecodable")
        mono = data[:, segment.channel]
    else:
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
    segment: AudioSegment | None = None,
) -> np.ndarray:
    """Reads an audio file (or a `segment` of it) as mono int16 [samples] at `sample_rate`.

    Any format libsndfile reads (WAV, FLAC, OGG, MP3, ...). Channels are averaged; other
    rates are resampled with soxr (high quality). A segment is cut at the file's own rate
    (seeking, without decoding what comes before where the format allows) and then resampled;
    the duration limits apply to it. Raises AudioError if the file is missing, empty,
    undecodable, shorter than the segment, or its duration is outside [min_seconds, max_seconds].
    """
    source = os.fspath(path)
    if storage.is_remote(source):
        return decode_audio(
            _read_remote(source),
            sample_rate=sample_rate,
            min_seconds=min_seconds,
            max_seconds=max_seconds,
            source=source,
            segment=segment,
        )
    try:
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEAD_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise AudioError(source, "missing", "missing_file") from e
    except OSError as e:
        raise AudioError(source, f"cannot read: {e.strerror or e}", "unreadable") from e
    _check_container(source, head, size)
    return _decode(source, source, sample_rate, min_seconds, max_seconds, segment)


def _read_remote(source: str) -> bytes:
    """The bytes of an audio file in an object store (one request: audio files are small)."""
    try:
        return storage.path(source).read_bytes()
    except FileNotFoundError as e:
        raise AudioError(source, "missing", "missing_file") from e
    except OSError as e:
        raise AudioError(source, f"cannot read: {e}", "unreadable") from e


def decode_audio(
    data: bytes,
    *,
    sample_rate: int = 16000,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    source: str = "<bytes>",
    segment: AudioSegment | None = None,
) -> np.ndarray:
    """`load_audio` for an encoded file held in memory (TFDS / ArrayRecord features, Hugging Face
    Audio columns)."""
    _check_container(source, data[:_HEAD_BYTES], len(data))
    return _decode(source, io.BytesIO(data), sample_rate, min_seconds, max_seconds, segment)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding); AudioError if unreadable."""
    source = os.fspath(path)
    if storage.is_remote(source):
        handle: str | io.BytesIO = io.BytesIO(_read_remote(source))
    elif not os.path.isfile(source):
        raise AudioError(source, "missing", "missing_file")
    else:
        handle = source
    try:
        info = sf.info(handle)
    except sf.SoundFileError as e:
        raise AudioError(source, f"cannot decode: {e}", "undecodable") from e
    return info.frames / info.samplerate


def encoded_duration(data: bytes, *, source: str = "<bytes>") -> float:
    """`audio_duration` of an encoded file held in memory (a Hugging Face Audio row's bytes)."""
    _check_container(source, data[:_HEAD_BYTES], len(data))
    try:
        info = sf.info(io.BytesIO(data))
    except sf.SoundFileError as e:
        raise AudioError(source, f"cannot decode: {e}", "undecodable") from e
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
