"""The toy-world check of active selection: same synthetic-speech budget, active vs uniform.

    python -m speechlm_jax.demo.selection_study --stage1 demo_out/recipes/salad --out /tmp/select_toy

From one stage-1 SALAD run (the toy demo's), with `speechlm-select`'s own stages:

    shared    a text corpus of toy-world training sentences not in the stage-1 speech,
              embedded with the stage-1 LLM, balanced k-means, probed (M before)
    active    P(c) ∝ P_web(c) M(c)^gamma, synthesised, stage 2 through the trainer
    uniform   gamma = 0 (P = P_web: uniform over the corpus), the same budget, the same
              stage-2 steps from the same checkpoint

and measures the held-out misalignment M (toy-world held-out sentences, which no stage
trained on) of the stage-1 model and of both stage-2 models with `speechlm-eval --corpus`.
Prints one JSON line `{"selection_toy": {...}}` and writes it to `<out>/result.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speechlm_jax import cli
from speechlm_jax.evaluation import main as eval_main
from speechlm_jax.selection import main as select
from speechlm_jax.toyworld.sentences import sentences
from speechlm_jax.train.restore import read_config as load_run_config

SHARED = ("embed", "cluster", "probe_before")


def _stage1_texts(stage1: str | Path) -> set[str]:
    texts = set()
    for spec in load_run_config(stage1).data.speech_sources:
        if dict(spec)["type"] == "manifest":
            for line in Path(dict(spec)["path"]).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.add(" ".join(json.loads(line)["text"].split()))
    return texts


def write_corpus(path: Path, stage1: str | Path, size: int, seed: int) -> Path:
    """`size` toy training sentences that the stage-1 speech does not contain, as JSONL."""
    seen = _stage1_texts(stage1)
    fresh = [s for s in sentences("train", size * 4 + len(seen), seed=seed) if s not in seen][:size]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"t{i:05d}", "text": t}) + "\n" for i, t in enumerate(fresh)))
    return path


def heldout_misalignment(run: str | Path, corpus: Path, out: Path, batch_size: int) -> dict[str, Any]:
    """`speechlm-eval --corpus` of a run: SALAD's M and F on the held-out sentences."""
    result = eval_main.evaluate(workdir=str(run), corpus=str(corpus), out=str(out), batch_size=batch_size)
    print(json.dumps({"speechlm_eval": eval_main.headline(result)}), flush=True)
    return result["diagnostics"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).absolute()
    corpus = out / "corpus.jsonl"
    if not corpus.is_file():
        write_corpus(corpus, args.stage1, args.corpus_size, args.seed)
    heldout = out / "heldout.txt"
    heldout.write_text("\n".join(sentences("heldout", args.heldout, seed=args.seed + 1)) + "\n")
    common = dict(
        corpus=str(corpus),
        stage1=str(args.stage1),
        clusters=args.clusters,
        tolerance=args.tolerance,
        probe_size=args.probe_size,
        budget_fraction=args.budget_fraction,
        steps=args.steps,
        repeat=args.repeat,
        batch_size=args.batch_size,
        tts_workers=args.tts_workers,
        quiet=True,
        seed=args.seed,
        max_new_tokens=16,
        set=[f"train.compilation_cache={out / 'xla_cache'}"],
    )
    select.run_stages(
        ["embed", "cluster", "probe", "sample", "synthesize", "targets", "train", "probe_after", "report"],
        workdir=str(out / "active"),
        gamma=args.gamma,
        **common,
    )
    uniform = out / "uniform"
    uniform.mkdir(parents=True, exist_ok=True)
    for name in SHARED:  # the same corpus, clusters and probes: only the sampling differs
        if not (uniform / name).exists():
            shutil.copytree(out / "active" / name, uniform / name)
    select.run_stages(
        ["sample", "synthesize", "targets", "train", "probe_after", "report"], workdir=str(uniform), gamma=0.0, **common
    )

    result: dict[str, Any] = {
        "budget_fraction": args.budget_fraction,
        "gamma": args.gamma,
        "steps": args.steps,
        "clusters": args.clusters,
        "heldout_sentences": args.heldout,
    }
    runs = {"stage1": Path(args.stage1), "active": out / "active" / "train", "uniform": uniform / "train"}
    for name, workdir in runs.items():
        d = heldout_misalignment(workdir, heldout, out / "eval" / name, args.batch_size)
        result[f"heldout_M_{name}"] = d["misalignment"]["per_token"]
        result[f"heldout_F_{name}"] = d["forgetting"]["per_token"]
    for name in ("active", "uniform"):
        summary = select.selection_summary(out / name)
        result[f"speech_seconds_{name}"] = summary["selected_seconds"]
        result[f"probe_M_after_{name}"] = summary["overall"]["m_after"]
        result["probe_M_before"] = summary["overall"]["m_before"]
    result["active_lowers_M_more"] = result["heldout_M_active"] < result["heldout_M_uniform"]
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"selection_toy": result}), flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m speechlm_jax.demo.selection_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage1", required=True, help="the stage-1 SALAD run (the toy demo's salad workdir)")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus_size", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--probe_size", type=int, default=12)
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--budget_fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tts_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (the result is in `<out>/result.json`)."""
    return cli.run_command("selection_study", lambda: run(build_parser().parse_args(argv)), (select.StageError,))


if __name__ == "__main__":
    sys.exit(main())
