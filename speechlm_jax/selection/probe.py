"""Step 3 of active selection: the current model's misalignment M(c) on every text cluster.

    clusters (assignments [N]) -> `probe_size` texts per cluster, drawn with the seed
      -> their spoken prefixes synthesised with the TTS tool (`data.tts_corpus.synthesize_corpus`,
         parallel, resumable) into <out>/speech/manifest.jsonl
      -> the evaluation harness's SALAD diagnostics (`evaluation.diagnostics.corpus_segments`
         + `Scorer.divergences`): per text, the summed KL(P(w | text prefix) || P(w | speech
         prefix)) over the written tokens that follow the spoken prefix, batched on the mesh
      -> M(c) = sum over the cluster's probe texts / their scored tokens (per token, as the
         harness reports M), and the mean per-text sum (per sequence)

Scores are appended to <out>/scores.jsonl cluster chunk by cluster chunk, so an
interrupted probe resumes with the first cluster not yet scored. The probe texts are kept
out of the sampled training texts (`sample.draw(exclude=...)`), so the "M after" of
stage 2 is measured on texts the model has not been trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.tts import Synthesizer, Voice
from speechlm_jax.data.tts_corpus import synthesize_corpus
from speechlm_jax.evaluation import diagnostics
from speechlm_jax.evaluation.scoring import SAMPLE_RATE, Scorer, TTSSpeech

SCORES = "scores.jsonl"


def choose_probes(
    assignments: np.ndarray, num_clusters: int, probe_size: int, *, seed: int = 0
) -> dict[int, list[int]]:
    """Per cluster, up to `probe_size` corpus indices drawn uniformly without replacement (sorted)."""
    rng = np.random.default_rng(seed)
    probes = {}
    for c in range(num_clusters):
        members = np.flatnonzero(np.asarray(assignments) == c)
        take = min(probe_size, len(members))
        probes[c] = sorted(int(i) for i in rng.choice(members, size=take, replace=False))
    return probes


def spoken_prefix(sentence: str, prefix_fraction: float) -> str:
    """The words of `sentence` the diagnostics speak (the first `prefix_fraction`, at least one)."""
    words = sentence.split()
    spoken = min(len(words), max(1, round(len(words) * prefix_fraction)))
    return " ".join(words[:spoken])


class ManifestSpeech:
    """Speech read from a synthesised manifest by its text; texts it lacks fall back to the live TTS."""

    def __init__(self, manifest: str | Path, fallback: TTSSpeech | None = None):
        manifest = Path(manifest)
        self.files: dict[str, Path] = {}
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                self.files[" ".join(row["text"].split())] = manifest.parent / row["audio"]
        self.fallback = fallback if fallback is not None else TTSSpeech()
        self.misses = 0

    def waveform(self, text: str, audio: str | None) -> np.ndarray:
        path = self.files.get(" ".join(text.split())) if audio is None else Path(audio)
        if path is None:
            self.misses += 1
            return self.fallback.waveform(text, None)
        return load_audio(str(path), sample_rate=SAMPLE_RATE)


def synthesize_probes(
    texts: Mapping[int, str],
    out_dir: str | Path,
    *,
    prefix_fraction: float,
    voices: Sequence[Voice] = (Voice(),),
    workers: int = 1,
    synthesizer: Synthesizer | None = None,
) -> Path:
    """Speaks the spoken prefix of every probe text {corpus index: text}; returns the manifest path."""
    prefixes = {spoken_prefix(t, prefix_fraction) for t in texts.values()}
    items = [{"id": f"probe{i:06d}", "text": p} for i, p in enumerate(sorted(prefixes))]
    return synthesize_corpus(
        items, Path(out_dir), voices=list(voices), workers=workers, synthesizer=synthesizer
    ).manifest


def _done_clusters(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {json.loads(line)["cluster"] for line in path.read_text().splitlines() if line.strip()}


def score_clusters(
    scorer: Scorer,
    probes: Mapping[int, Sequence[int]],
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    prefix_fraction: float = 0.5,
    clusters_per_chunk: int = 16,
) -> Path:
    """Scores every probe text with the harness (see the module docstring) into <out_dir>/scores.jsonl.

    Rows: {"cluster", "index", "m_sum", "m_tokens", "f_sum", "f_tokens"} (M and F of one text).
    A chunk's rows are written together, so a cluster is either fully scored or not at all.
    """
    path = Path(out_dir) / SCORES
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = [c for c in sorted(probes) if c not in _done_clusters(path) and probes[c]]
    for start in range(0, len(todo), clusters_per_chunk):
        chunk = [(c, i) for c in todo[start : start + clusters_per_chunk] for i in probes[c]]
        prepared = [scorer.prepare(diagnostics.corpus_segments(scorer, texts[i], prefix_fraction)) for _, i in chunk]
        out = scorer.divergences(prepared)
        rows = [
            {
                "cluster": c,
                "index": i,
                "m_sum": float(out["misalignment"][k]),
                "m_tokens": float(out["misalignment_tokens"][k]),
                "f_sum": float(out["forgetting"][k]),
                "f_tokens": float(out["forgetting_tokens"][k]),
            }
            for k, (c, i) in enumerate(chunk)
        ]
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cluster_misalignment(scores_path: str | Path, num_clusters: int) -> dict[str, Any]:
    """Per cluster M (per token and per sequence), F per token and the probe count, as lists [K].

    A cluster without scored tokens gets NaN.
    """
    m_sum, m_tok, f_sum, f_tok, count = (np.zeros(num_clusters) for _ in range(5))
    seq = [[] for _ in range(num_clusters)]
    for line in Path(scores_path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        c = r["cluster"]
        m_sum[c] += r["m_sum"]
        m_tok[c] += r["m_tokens"]
        f_sum[c] += r["f_sum"]
        f_tok[c] += r["f_tokens"]
        count[c] += 1
        seq[c].append(r["m_sum"])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = np.where(m_tok > 0, m_sum / m_tok, np.nan)
        forgetting = np.where(f_tok > 0, f_sum / f_tok, np.nan)
    return {
        "misalignment": per_token.tolist(),
        "misalignment_per_sequence": [float(np.mean(s)) if s else float("nan") for s in seq],
        "forgetting": forgetting.tolist(),
        "probes": count.astype(int).tolist(),
        "overall_misalignment": float(m_sum.sum() / m_tok.sum()) if m_tok.sum() else float("nan"),
    }
