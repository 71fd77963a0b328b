"""Audio decoding: formats, resampling against librosa, channel mixing, segments of longer files,
and AudioError."""

import librosa
import numpy as np
import pytest
import soundfile as sf

from speechlm_jax.data.audio import (
    AudioError,
    AudioSegment,
    audio_duration,
    decode_audio,
    encoded_duration,
    load_audio,
    save_audio,
    to_int16,
)


def _tone(sample_rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """float32 [samples, channels]: a few partials below 7 kHz plus a little noise."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    rng = np.random.default_rng(sample_rate)
    mono = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (220.0, 1234.5, 3100.0, 6500.0))
    cols = [mono * (0.5 + 0.5 * c) + 0.01 * rng.standard_normal(t.size) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_int16_round_trip_is_exact(tmp_path, suffix):
    audio = to_int16(_tone(16000, 0.5)[:, 0])
    path = save_audio(tmp_path / f"clip{suffix}", audio, 16000)
    loaded = load_audio(path)
    assert loaded.dtype == np.int16 and loaded.shape == audio.shape
    np.testing.assert_array_equal(loaded, audio)
    assert audio_duration(path) == pytest.approx(0.5)
    assert [p.name for p in tmp_path.iterdir()] == [f"clip{suffix}"]  # no temporary left behind


@pytest.mark.parametrize("native_rate", [22050, 44100])
@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_resampling_matches_librosa(tmp_path, native_rate, suffix):
    audio = _tone(native_rate, 1.0)[:, 0]
    path = tmp_path / f"clip{suffix}"
    sf.write(path, audio, native_rate, subtype="PCM_16")
    stored = sf.read(path, dtype="float32")[0]
    expected = librosa.resample(stored, orig_sr=native_rate, target_sr=16000, res_type="soxr_hq")
    loaded = load_audio(path)
    assert loaded.shape == expected.shape == (16000,)
    np.testing.assert_allclose(loaded / 32768.0, expected, atol=2 / 32768)


def test_stereo_is_averaged_to_mono(tmp_path):
    stereo = _tone(16000, 0.25, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), to_int16(stereo.mean(axis=1)))


def test_decode_audio_from_bytes_equals_load_audio(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, _tone(44100, 0.3)[:, 0], 44100, subtype="PCM_16")
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), load_audio(path))


def test_duration_limits(tmp_path):
    path = save_audio(tmp_path / "clip.wav", to_int16(_tone(16000, 1.0)[:, 0]))
    assert load_audio(path, min_seconds=0.5, max_seconds=2.0).shape == (16000,)
    with pytest.raises(AudioError, match="too short") as info:
        load_audio(path, min_seconds=1.5)
    assert info.value.cause == "too_short"
    with pytest.raises(AudioError, match="too long") as info:
        load_audio(path, max_seconds=0.5)
    assert info.value.cause == "too_long"


def _bad_files(tmp_path):
    missing = tmp_path / "missing.flac"
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.flac"
    save_audio(truncated, to_int16(_tone(16000, 1.0)[:, 0]))
    truncated.write_bytes(truncated.read_bytes()[:30])
    cut = tmp_path / "cut.flac"  # the header is intact, the stream stops halfway
    save_audio(cut, to_int16(_tone(16000, 1.0)[:, 0]))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    cut_wav = tmp_path / "cut.wav"  # libsndfile alone would read this as a shorter clip
    save_audio(cut_wav, to_int16(_tone(16000, 1.0)[:, 0]))
    cut_wav.write_bytes(cut_wav.read_bytes()[: cut_wav.stat().st_size // 2])
    no_frames = tmp_path / "no_frames.wav"
    sf.write(no_frames, np.zeros((0,), np.int16), 16000)
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    return [(missing, "missing", "missing_file"), (empty, "empty", "empty_file"),
            (garbage, "cannot decode", "undecodable"), (truncated, "cannot decode", "undecodable"),
            (cut, "truncated", "truncated"), (cut_wav, "truncated", "truncated"),
            (no_frames, "no audio frames", "empty_audio"), (folder, "missing", "missing_file")]  # fmt: skip


def test_unusable_files_raise_audio_error_with_their_cause(tmp_path):
    for path, reason, cause in _bad_files(tmp_path):
        with pytest.raises(AudioError) as info:
            load_audio(path)
        assert isinstance(info.value, ValueError)
        assert info.value.source == str(path) and reason in info.value.reason, (path, info.value.reason)
        assert info.value.cause == cause, path
        assert str(path) in str(info.value)
        if path.is_file() and path.stat().st_size:
            with pytest.raises(AudioError) as from_bytes:
                decode_audio(path.read_bytes(), source=str(path))
            assert from_bytes.value.cause == cause, path
    with pytest.raises(AudioError, match="empty") as info:
        decode_audio(b"")
    assert info.value.cause == "empty_file"
    with pytest.raises(AudioError, match="cannot decode") as info:
        decode_audio(b"RIFF1234WAVEjunk", source="shard-3/17")
    assert info.value.cause == "undecodable"


def test_a_wav_of_unknown_length_is_not_taken_as_truncated(tmp_path):
    # Streaming writers leave the data size 0xFFFFFFFF; the frames present are the clip.
    path = save_audio(tmp_path / "stream.wav", to_int16(_tone(16000, 0.5)[:, 0]))
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert load_audio(path).shape == (8000,)


def test_save_audio_rejects_float_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="int16"):
        save_audio(tmp_path / "x.flac", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="suffix"):
        save_audio(tmp_path / "x.mp4", np.zeros(10, np.int16))


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_a_segment_is_the_slice_of_the_whole_file(tmp_path, suffix):
    path = save_audio(tmp_path / f"long{suffix}", to_int16(_tone(16000, 2.0)[:, 0]))
    whole = load_audio(path)
    for offset, duration in [(0.0, 0.5), (0.37, 1.2), (1.5, None), (1.25, 0.75)]:
        segment = AudioSegment(offset, duration)
        start = round(offset * 16000)
        stop = None if duration is None else start + round(duration * 16000)
        np.testing.assert_array_equal(load_audio(path, segment=segment), whole[start:stop])
        np.testing.assert_array_equal(decode_audio(path.read_bytes(), segment=segment), whole[start:stop])


def test_a_segment_at_another_rate_is_cut_then_resampled_like_librosa(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, _tone(44100, 1.5)[:, 0], 44100, subtype="PCM_16")
    stored = sf.read(path, dtype="float32")[0]
    start, count = round(0.4 * 44100), round(0.8 * 44100)
    expected = librosa.resample(stored[start : start + count], orig_sr=44100, target_sr=16000, res_type="soxr_hq")
    loaded = load_audio(path, segment=AudioSegment(0.4, 0.8))
    assert loaded.shape == expected.shape == (12800,)
    np.testing.assert_allclose(loaded / 32768.0, expected, atol=2 / 32768)


def test_a_segment_of_one_channel(tmp_path):
    stereo = _tone(16000, 1.0, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(
        load_audio(path, segment=AudioSegment(0.25, 0.5, channel=1)), to_int16(stereo[4000:12000, 1])
    )
    np.testing.assert_array_equal(load_audio(path, segment=AudioSegment(channel=0)), to_int16(stereo[:, 0]))
    with pytest.raises(AudioError, match="no channel 2") as info:
        load_audio(path, segment=AudioSegment(channel=2))
    assert info.value.cause == "undecodable"


def test_a_segment_past_the_end_of_the_file_is_truncated_audio(tmp_path):
    path = save_audio(tmp_path / "clip.wav", to_int16(_tone(16000, 1.0)[:, 0]))
    # A duration rounded up by a few milliseconds reads the frames present.
    assert load_audio(path, segment=AudioSegment(0.5, 0.51)).shape == (8000,)
    for segment, reason in [(AudioSegment(0.5, 0.6), "ends at 1.100s"), (AudioSegment(1.2, 0.1), "starts at 1.200s")]:
        with pytest.raises(AudioError, match=reason) as info:
            load_audio(path, segment=segment)
        assert info.value.cause == "truncated" and str(path) in str(info.value)
    with pytest.raises(AudioError, match="too short") as info:
        load_audio(path, segment=AudioSegment(0.0, 0.2), min_seconds=0.5)
    assert info.value.cause == "too_short"


def test_encoded_duration_reads_the_header_of_bytes(tmp_path):
    path = save_audio(tmp_path / "clip.flac", to_int16(_tone(16000, 0.75)[:, 0]))
    assert encoded_duration(path.read_bytes()) == pytest.approx(audio_duration(path)) == pytest.approx(0.75)
    with pytest.raises(AudioError, match="shard-1 row 3: cannot decode") as info:
        encoded_duration(b"RIFF1234WAVEjunk", source="shard-1 row 3")
    assert info.value.cause == "undecodable"
