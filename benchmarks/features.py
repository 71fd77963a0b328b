"""Log-mel throughput: our jitted JAX path against transformers' WhisperFeatureExtractor.

The batch is 64 clips of 10 s of eSpeak speech (4 voices), as int16. Ours runs on the
default JAX backend after a warm-up compile; the reference is the extractor's numpy path
(what it runs without torch) and, for information, its torch path (what it runs when torch
is installed). Times are the median of several runs. The last line printed is one JSON
object: ours_s, hf_s (numpy path), speedup, hf_torch_s, speedup_vs_torch, max_abs_diff.

    .venv/bin/python benchmarks/features.py [--clips 64] [--seconds 10] [--n-mels 80]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from transformers import WhisperFeatureExtractor

from speechlm_jax.data.tts import EspeakSynthesizer, Voice
from speechlm_jax.models.frontend import log_mel_spectrogram

PARAGRAPH = (
    "Speech language models learn to listen by aligning a speech encoder to a text model. "
    "The teacher reads the transcript, the student hears the audio, and the two should agree. "
    "Good data matters more than clever losses, and synthetic speech fills the gaps "
    "where no recordings exist. Numbers like 42 and 1999 are read out in full. "
)


def speech_batch(clips: int, seconds: float) -> np.ndarray:
    """int16 [clips, seconds * 16000]: windows cut from long eSpeak paragraphs."""
    synth = EspeakSynthesizer()
    voices = [
        Voice("en-us", 170, 50),
        Voice("en-gb+f3", 190, 65),
        Voice("en+m3", 150, 40),
        Voice("en-029", 210, 55),
    ]
    length = int(seconds * 16000)
    rng = np.random.default_rng(0)
    streams = [np.tile(synth.synthesize(PARAGRAPH * 2, v).audio, 2) for v in voices]
    rows = []
    for i in range(clips):
        stream = streams[i % len(streams)]
        start = rng.integers(0, len(stream) - length)
        rows.append(stream[start : start + length])
    return np.stack(rows)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--n-mels", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    audio = speech_batch(args.clips, args.seconds)
    waveforms = audio.astype(np.float32) / 32768.0
    length = audio.shape[1]

    device_audio = jax.device_put(jnp.asarray(audio))
    start = time.perf_counter()
    log_mel_spectrogram(device_audio, n_mels=args.n_mels).block_until_ready()
    compile_s = time.perf_counter() - start
    ours_s, ours = timed(
        lambda: log_mel_spectrogram(device_audio, n_mels=args.n_mels).block_until_ready(), args.repeats
    )
    ours = np.asarray(ours)

    extractor = WhisperFeatureExtractor(feature_size=args.n_mels)
    # The numpy path is what __call__ runs when torch is not installed.
    hf_s, hf = timed(lambda: extractor._np_extract_fbank_features(waveforms, "cpu"), max(2, args.repeats // 2))
    hf_torch_s, hf_torch = timed(
        lambda: (
            extractor(
                list(waveforms),
                sampling_rate=16000,
                padding="max_length",
                max_length=length,
                return_tensors="np",
            ).input_features
        ),
        max(2, args.repeats // 2),
    )
    max_abs_diff = float(np.abs(ours - hf).max())
    max_abs_diff_torch = float(np.abs(ours - hf_torch).max())
    print(f"batch {audio.shape} int16, {args.n_mels} mels, jax backend {jax.default_backend()}")
    print(f"ours {ours_s:.3f}s (compile {compile_s:.2f}s), HF numpy {hf_s:.3f}s, HF torch {hf_torch_s:.3f}s")
    result = {
        "benchmark": "log_mel_spectrogram",
        "clips": args.clips,
        "seconds": args.seconds,
        "n_mels": args.n_mels,
        "backend": jax.default_backend(),
        "ours_s": round(ours_s, 4),
        "hf_s": round(hf_s, 4),
        "speedup": round(hf_s / ours_s, 2),
        "hf_torch_s": round(hf_torch_s, 4),
        "speedup_vs_torch": round(hf_torch_s / ours_s, 2),
        "max_abs_diff": max_abs_diff,
        "max_abs_diff_torch": max_abs_diff_torch,
        "compile_s": round(compile_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
