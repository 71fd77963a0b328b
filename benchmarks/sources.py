"""Throughput of the Hugging Face source against the JSONL manifest on the same audio.

Writes one corpus of 16 kHz FLAC clips (noise, 1-4 s, random words; cached under
--workdir) five ways: a JSONL manifest of paths, a `save_to_disk` folder and Parquet shards
with the audio bytes inside (`datasets`' own writers, `Dataset.from_dict` +
`cast_column("audio", Audio())`; the shards once as `to_parquet` groups rows by default and
once in row groups of 8, `to_parquet(batch_size=8)`), and Parquet naming the paths. For each it times
- `read`: the source's records in shuffled order, each one's audio decoded (`maker.record_audio`),
  the cost of the source itself;
- `pipeline`: the whole Grain pipeline (train split: shuffled, ASR examples, batches of 8).
The forms take turns in each of --repeats rounds, best rate each. Prints one JSON line:
examples/s of each, and each hf form's ratio to the manifest.

    python benchmarks/sources.py [--utterances 1024] [--batches 24] [--repeats 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
from absl import flags

from speechlm_jax.data import hf_source
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.maker import record_audio
from speechlm_jax.data.mixture import open_speech_source
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.tasks import TASKS
from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer

SR = 16000
VOCABULARY = (
    "the a small large red blue green dog cat bird house river garden morning evening light "
    "runs walks sees finds keeps opens reads writes quickly slowly today again under over near"
).split()


def _corpus(workdir: Path, utterances: int) -> dict[str, dict]:
    """The source specs of the five forms of one corpus."""
    root = workdir / f"corpus_{utterances}"
    specs = {
        "manifest": {"type": "manifest", "path": str(root / "manifest.jsonl")},
        "hf_disk": {"type": "hf", "path": str(root / "disk")},
        "hf_parquet": {"type": "hf", "path": str(root / "parquet")},
        "hf_parquet_groups_of_8": {"type": "hf", "path": str(root / "parquet_8")},
        "hf_parquet_paths": {"type": "hf", "path": str(root / "parquet_paths")},
    }
    if (root / "done_5").exists():
        return specs
    from datasets import Audio, Dataset

    rng = np.random.default_rng(0)
    (root / "flac").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(utterances):
        audio = (rng.standard_normal(int(rng.uniform(1.0, 4.0) * SR)) * 3000).astype(np.int16)
        path = root / "flac" / f"b{i:04d}.flac"
        sf.write(path, audio, SR, subtype="PCM_16")
        text = " ".join(rng.choice(VOCABULARY, size=int(rng.integers(6, 14))))
        rows.append({"id": f"b{i:04d}", "audio": str(path), "text": text})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids, texts = [r["id"] for r in rows], [r["text"] for r in rows]
    embedded = [{"bytes": Path(r["audio"]).read_bytes(), "path": Path(r["audio"]).name} for r in rows]
    with_bytes = Dataset.from_dict({"id": ids, "audio": embedded, "text": texts}).cast_column("audio", Audio())
    with_bytes.save_to_disk(str(root / "disk"))
    shards = 8
    for k in range(shards):
        part = with_bytes.shard(shards, k, contiguous=True)
        part.to_parquet(str(root / "parquet" / f"train-{k:05d}-of-{shards:05d}.parquet"))
        part.to_parquet(str(root / "parquet_8" / f"train-{k:05d}-of-{shards:05d}.parquet"), batch_size=8)
    paths = Dataset.from_dict({"id": ids, "audio": [r["audio"] for r in rows], "text": texts})
    paths.cast_column("audio", Audio()).to_parquet(str(root / "parquet_paths" / "train-00000-of-00001.parquet"))
    (root / "done_5").write_text("")
    return specs


def _row_groups(folder: str) -> int:
    return sum(pq.ParquetFile(f).metadata.num_row_groups for f in sorted(Path(folder).glob("*.parquet")))


def _read_rate(spec: dict, count: int) -> float:
    """Examples/s of opening the source and reading `count` shuffled records with their audio."""
    start = time.perf_counter()
    source = open_speech_source(spec, "train")
    order = np.random.default_rng(0).permutation(len(source))
    for index in np.resize(order, count):
        record_audio(source[int(index)], SR)
    return count / (time.perf_counter() - start)


def _pipeline_rate(spec: dict, tokenizer, batches: int, num_threads: int) -> float:
    config = PipelineConfig(
        speech_sources=(spec,),
        kinds={"asr": 1.0},
        max_slots=1,
        buckets=((SR * 4, 96),),
        teacher_tokens=96,
        batch_size=8,
        num_threads=num_threads,
        prefetch_buffer_size=32,
    )
    iterator, _ = build_pipeline(config, tokenizer=tokenizer, split="train", seed=0)
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    examples = sum(int(next(iterator)["weight"].sum()) for _ in range(batches))
    return examples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/speechlm_jax_sources_bench")
    parser.add_argument("--utterances", type=int, default=1024)
    parser.add_argument("--reads", type=int, default=256)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    workdir = Path(args.workdir)
    specs = _corpus(workdir, args.utterances)
    prompts = [p for task in TASKS.values() for p in task.prompts_train]
    tokenizer = load_tokenizer(build_word_tokenizer(list(VOCABULARY) + prompts, workdir / "tokenizer"))
    # The forms take turns in each round (a shared machine's load falls on all of them); best of the rounds.
    read, pipeline = dict.fromkeys(specs, 0.0), dict.fromkeys(specs, 0.0)
    for _ in range(args.repeats):
        for name, spec in specs.items():
            read[name] = max(read[name], _read_rate(spec, args.reads))
            pipeline[name] = max(pipeline[name], _pipeline_rate(spec, tokenizer, args.batches, args.num_threads))
    print(
        json.dumps(
            {
                "benchmark": "sources",
                "read_examples_per_s": {k: round(v, 1) for k, v in read.items()},
                "pipeline_examples_per_s": {k: round(v, 1) for k, v in pipeline.items()},
                "read_ratio_to_manifest": {
                    k: round(v / read["manifest"], 3) for k, v in read.items() if k != "manifest"
                },
                "pipeline_ratio_to_manifest": {
                    k: round(v / pipeline["manifest"], 3) for k, v in pipeline.items() if k != "manifest"
                },
                "utterances": args.utterances,
                # Parquet is read a row group at a time, a few kept: more groups than that, random reads miss.
                "parquet_row_groups": _row_groups(specs["hf_parquet"]["path"]),
                "parquet_8_row_groups": _row_groups(specs["hf_parquet_groups_of_8"]["path"]),
                "row_groups_kept": hf_source._ROW_GROUPS_KEPT,
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "num_threads": args.num_threads,
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
