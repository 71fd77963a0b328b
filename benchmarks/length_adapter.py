"""What the CTC length adapter does: audio positions per second of speech, and step FLOPs at full scale.

Two measurements, one JSON line:
1. On a CTC-aligned run (default: the demo's `demo_out/align/run`) and its held-out speech
   (default: `demo_out/speech/heldout/manifest.jsonl`): the valid audio positions per second
   of speech and per transcript word the LLM reads without the adapter (every projector
   frame) and with it (one pooled position per best-path token), over `--utterances`
   utterances. A connector read out well gives about one position per word with it.
2. `salad:paper` (Llama-3.2-3B + Whisper-large-v3, its own batch shape, abstract weights: no
   memory) with `model.length_adapter.enabled` off and on: the model FLOPs of one step
   (`train.metrics.step_flops`, what MFU divides by), by part. The pooled frames keep the
   slot's static length, so the LLM's FLOPs do not change; the adapter adds its greedy
   readout of every frame through the LLM's head, and its "embeddings" output (the LLM's
   embeddings under each pooled frame's posterior) a second head product and the mixture.

Run from the repository root: `.venv/bin/python -m benchmarks.length_adapter` (about a
minute on 2 CPU cores, after `make demo` has built the alignment run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def positions(workdir: str, manifest: str, utterances: int) -> dict[str, float]:
    """Audio positions per second and per word, without and with the adapter, on `manifest`'s clips."""
    from speechlm_jax.data.audio import load_audio
    from speechlm_jax.evaluation.main import load_run
    from speechlm_jax.models.speechlm import pool_token_frames
    from speechlm_jax.sharding import make_mesh

    model, config, _ = load_run(workdir, make_mesh({"data": -1}))
    blank = int(config.model.length_adapter.blank_id)
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()[:utterances]]
    before = after = seconds = words = 0.0

    @jax.jit
    def counts(audio: jax.Array, lens: jax.Array) -> tuple[jax.Array, jax.Array]:
        embeds, mask = model.project_audio(audio, lens)
        _, pooled = pool_token_frames(embeds, mask, model.best_path(embeds), blank_id=blank)
        return mask.sum(axis=1), pooled.sum(axis=1)

    for record in records:
        wave = load_audio(Path(manifest).parent / record["audio"])  # relative to the manifest, absolute kept
        length = -(-len(wave) // 16000) * 16000  # whole seconds: one compile per clip length
        audio = np.zeros((1, length), np.int16)
        audio[0, : len(wave)] = wave
        frames, pooled = counts(jnp.asarray(audio), jnp.asarray([len(wave)], jnp.int32))
        before += float(frames[0])
        after += float(pooled[0])
        seconds += len(wave) / 16000
        words += len(record["text"].split())
    return {
        "utterances": len(records),
        "positions_per_second_without": before / seconds,
        "positions_per_second_with": after / seconds,
        "positions_per_word_without": before / words,
        "positions_per_word_with": after / words,
    }


def paper_flops() -> dict[str, float]:
    """salad:paper's step FLOPs, with the adapter off, on (pooled frames) and on with its embeddings output."""
    from speechlm_jax.train import compile_aot
    from speechlm_jax.train.config import load_config_file

    root = Path(__file__).resolve().parents[1] / "speechlm_jax" / "configs"
    out = {}
    for name, enabled, output in (
        ("without", False, "frames"),
        ("with", True, "frames"),
        ("embeddings", True, "embeddings"),
    ):
        config = load_config_file(f"{root / 'salad.py'}:paper")
        config.model.length_adapter.enabled = enabled
        config.model.length_adapter.output = output
        out[name] = compile_aot.model_flops(config, compile_aot.abstract_batch(config))
    out["ratio"] = out["with"] / out["without"]
    out["embeddings_ratio"] = out["embeddings"] / out["without"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo_out/align/run", help="a CTC-aligned run (loss.name=ctc)")
    parser.add_argument("--manifest", default="demo_out/speech/heldout/manifest.jsonl")
    parser.add_argument("--utterances", type=int, default=200)
    args = parser.parse_args()
    result = {"benchmark": "length_adapter", **positions(args.workdir, args.manifest, args.utterances)}
    flops = paper_flops()
    result.update(
        {
            "salad_paper_step_flops_without": flops["without"],
            "salad_paper_step_flops_with": flops["with"],
            "salad_paper_flops_ratio": flops["ratio"],
            "salad_paper_step_flops_embeddings": flops["embeddings"],
            "salad_paper_flops_ratio_embeddings": flops["embeddings_ratio"],
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
