"""Throughput of the full data pipeline: decode, resample, tokenize, interleave, bucket, batch.

Synthesizes a small corpus once (eSpeak NG, cached under --workdir), stores it as 24 kHz
FLAC so every example is decoded and resampled to 16 kHz, and times the Grain pipeline
on two CPU cores with half of the examples interleaved. Prints one JSON line with
`examples_per_s`.

    python benchmarks/pipeline.py [--num_workers 0] [--num_threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from absl import flags

from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.tasks import TASKS
from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from speechlm_jax.data.tts import Voice
from speechlm_jax.data.tts_corpus import synthesize_corpus

VOCABULARY = (
    "the a small large red blue green dog cat bird house river garden morning evening light "
    "runs walks sees finds keeps opens reads writes quickly slowly today again under over near "
    "behind with without old young happy quiet"
).split()
CORPUS_RATE = 24000


def _corpus(workdir: Path, utterances: int) -> Path:
    """A manifest of `utterances` sentences as 24 kHz FLAC with word timings."""
    manifest = workdir / f"corpus24k_{utterances}" / "manifest.jsonl"
    if manifest.exists():
        return manifest
    rng = np.random.default_rng(0)
    items = [
        {"id": f"b{i:04d}", "text": " ".join(rng.choice(VOCABULARY, size=int(rng.integers(8, 20))))}
        for i in range(utterances)
    ]
    voices = [Voice("en-us"), Voice("en-gb"), Voice("en-us", rate=150)]
    synth = synthesize_corpus(items, workdir / f"synth_{utterances}", voices=voices, workers=2).manifest
    manifest.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in synth.read_text().splitlines():
        row = json.loads(line)
        audio = load_audio(synth.parent / row["audio"])
        path = manifest.parent / f"{row['id']}.flac"
        resampled = soxr.resample(audio.astype(np.float32) / 32768.0, 16000, CORPUS_RATE)
        sf.write(path, np.clip(resampled * 32768.0, -32768, 32767).astype(np.int16), CORPUS_RATE, subtype="PCM_16")
        rows.append(dict(row, audio=path.name))
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/speechlm_jax_pipeline_bench")
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # Grain's worker processes (--num_workers) read absl flags
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    workdir = Path(args.workdir)
    manifest = _corpus(workdir, args.utterances)
    prompts = [p for task in TASKS.values() for p in task.prompts_train]
    tokenizer = load_tokenizer(build_word_tokenizer(list(VOCABULARY) + prompts, workdir / "tokenizer"))
    config = PipelineConfig(
        speech_sources=({"type": "manifest", "path": str(manifest)},),
        kinds={"asr": 1.0},
        interleave_prob=0.5,
        max_slots=4,
        buckets=((16000 * 4, 96), (16000 * 8, 128)),
        teacher_tokens=128,
        batch_size=args.batch_size,
        downsample=4,
        num_threads=args.num_threads,
        num_workers=args.num_workers,
        prefetch_buffer_size=4 * args.batch_size,
    )
    iterator, stats = build_pipeline(config, tokenizer=tokenizer, split="train", seed=0)
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    examples = 0
    for _ in range(args.batches):
        examples += int(next(iterator)["weight"].sum())
    elapsed = time.perf_counter() - start
    counts = stats.as_dict()
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "examples_per_s": round(examples / elapsed, 2),
                "batches_per_s": round(args.batches / elapsed, 3),
                "batch_size": args.batch_size,
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "num_threads": args.num_threads,
                "num_workers": args.num_workers,
                "source_rate_hz": CORPUS_RATE,
                "interleave_prob": config.interleave_prob,
                "skipped": {k: v for k, v in counts.items() if k.startswith("skipped")},
            }
        )
    )


if __name__ == "__main__":
    main()
