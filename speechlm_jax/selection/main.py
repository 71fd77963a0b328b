"""`speechlm-select`: SALAD stage 2, active selection of targeted synthetic speech, stage by stage.

    speechlm-select all --workdir /tmp/sel --corpus web.jsonl --stage1 /tmp/salad_run \\
        --clusters 128 --gamma 5 --budget_fraction 0.01 --steps 2000

Stages (run in this order; name one or several, or `all`), each writing into the workdir:

    embed        embed/shard-*.npz            text embeddings (the stage-1 LLM's mean-pooled
                                              hidden states, or --embedder HF_FOLDER)
    cluster      cluster/{centroids,assignments}.npy, cluster/summary.json
                                              balanced k-means (sizes within --tolerance)
    probe        probe_before/                probe texts per cluster, their TTS speech, M(c)
                                              of the stage-1 model
    sample       sample/selected.jsonl        texts drawn from P(c) ∝ P_web(c) M(c)^gamma
                                              up to the audio budget
    synthesize   synth/manifest.jsonl         the selected texts spoken (word timings included)
    targets      targets/*.jsonl              the teacher's answers for the new utterances
                                              (`speechlm-generate`), when the stage-1 mixture
                                              reads teacher targets (imitation, continuation)
    train        train/                       stage 2: the real trainer continues the stage-1
                                              checkpoint on the stage-1 mixture + synth/
    probe_after  probe_after/                 M(c) of the stage-2 model on the same probe texts
    report       report/selection.{json,md}, selection_clusters.png (and merged into
                                              --report_dir, an evaluation report folder)

Every stage resumes: embed by shard, probe by cluster chunk, synthesize by utterance, train
from its checkpoints. A finished stage records its settings in `<stage>/done.json` and is
skipped when run again with the same settings; other settings fail unless `--force`
(which clears that stage's folder first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from speechlm_jax import cli, storage
from speechlm_jax import stages as stage_cache
from speechlm_jax.cli import parse_mesh
from speechlm_jax.selection import kmeans, probe, report, sample

STAGES = ("embed", "cluster", "probe", "sample", "synthesize", "targets", "train", "probe_after", "report")


class StageError(RuntimeError):
    """A stage cannot run: missing inputs (or, as `StageChanged`, settings that differ from a finished run's)."""


def _done(folder: Path, settings: dict[str, Any], force: bool) -> bool:
    """Whether the stage in `folder` finished with these settings (clears it first with `force`)."""
    if force and folder.exists():
        shutil.rmtree(folder)
    return stage_cache.finished(folder, settings, on_change="refuse")


def _finish(folder: Path, settings: dict[str, Any]) -> None:
    stage_cache.finish(folder, settings)


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run the {stage} stage first")
    return path


def _mesh(args: argparse.Namespace) -> Any:
    from speechlm_jax.cli import parse_mesh
    from speechlm_jax.sharding import make_mesh

    return make_mesh(parse_mesh(args.mesh))


def _corpus(args: argparse.Namespace) -> list[dict[str, str]]:
    from speechlm_jax.data.sources import read_text_corpus

    if not args.corpus:
        raise StageError("--corpus is required")
    return read_text_corpus(args.corpus)


# --- Stages.


def stage_embed(args: argparse.Namespace) -> None:
    from speechlm_jax.selection import embed

    folder = Path(args.workdir) / "embed"
    settings = {
        "corpus": storage.absolute(args.corpus),
        "embedder": args.embedder or f"llm:{args.stage1}",
        "shard_size": args.shard_size,
        "max_tokens": args.max_tokens,
    }
    if _done(folder, settings, args.force):
        return
    records = _corpus(args)
    mesh = _mesh(args)
    if args.embedder and not embed.is_decoder_folder(args.embedder):
        embedder: embed.Embedder = embed.HFEncoderEmbedder(
            args.embedder, batch_size=args.batch_size, max_tokens=args.max_tokens
        )
    else:
        llm, tokenizer, rules = _embedding_llm(args, mesh)
        embedder = embed.LLMEmbedder(
            llm, tokenizer, mesh=mesh, rules=rules, batch_size=args.batch_size, max_tokens=args.max_tokens
        )
    embed.embed_corpus(records, embedder, folder, shard_size=args.shard_size)
    _finish(folder, dict(settings, texts=len(records)))


def _embedding_llm(args: argparse.Namespace, mesh: Any) -> tuple[Any, Any, Any]:
    """(DecoderLLM, tokenizer, rules): --embedder's decoder folder, else the stage-1 run's base LLM."""
    import jax.numpy as jnp

    from speechlm_jax.data.tokenizer import load_tokenizer
    from speechlm_jax.models import hf_import
    from speechlm_jax.sharding import DEFAULT_RULES
    from speechlm_jax.train import build
    from speechlm_jax.train import config as config_lib

    if args.embedder:
        return (
            hf_import.load_llm(args.embedder, dtype=jnp.float32, mesh=mesh),
            load_tokenizer(args.embedder),
            DEFAULT_RULES,
        )
    if not args.stage1:
        raise StageError("the built-in embedder is the stage-1 run's LLM: give --stage1 (or --embedder)")
    from speechlm_jax.train.restore import read_config as load_run_config

    config = load_run_config(args.stage1)
    rules = config_lib.sharding_rules(config)
    # The frozen base LLM as the run builds it; its adapters are not used (LoRA off).
    return build.build_model(config, mesh, rules).llm, load_tokenizer(config.data.tokenizer), rules


def stage_cluster(args: argparse.Namespace) -> None:
    from speechlm_jax.selection import embed

    workdir = Path(args.workdir)
    folder = workdir / "cluster"
    settings = {
        "clusters": args.clusters,
        "tolerance": args.tolerance,
        "iterations": args.iterations,
        "seed": args.seed,
        "normalize": not args.no_normalize,
    }
    if _done(folder, settings, args.force):
        return
    done = json.loads(_need(workdir / "embed" / "done.json", "embed").read_text())
    ids, vectors = embed.load_embeddings(workdir / "embed", done["texts"], done["shard_size"])
    if not args.no_normalize:
        vectors = kmeans.normalize_rows(vectors)
    mesh = _mesh(args)
    # The points shard over the mesh's batch axes when they divide evenly, else stay on one device.
    if len(vectors) % (mesh.shape["data"] * mesh.shape["fsdp"]):
        mesh = None
    result = kmeans.balanced_kmeans(
        vectors, args.clusters, tolerance=args.tolerance, iterations=args.iterations, seed=args.seed, mesh=mesh
    )
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "centroids.npy", result.centroids)
    np.save(folder / "assignments.npy", result.assignments)
    lower, upper = kmeans.size_bounds(len(vectors), args.clusters, args.tolerance)
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "sizes": result.sizes.tolist(),
                "bounds": [lower, upper],
                "iterations": result.iterations,
                "inertia": result.inertia,
                "texts": len(vectors),
            },
            indent=2,
        )
        + "\n"
    )
    _finish(folder, settings)


def _assignments(workdir: Path) -> np.ndarray:
    return np.load(_need(workdir / "cluster" / "assignments.npy", "cluster"))


def _probe(args: argparse.Namespace, tag: str, run: str) -> None:
    """M(c) of the run's model on the probe texts (chosen and spoken by the `probe` stage)."""
    from speechlm_jax.data.tasks import import_task_modules
    from speechlm_jax.data.tokenizer import load_tokenizer
    from speechlm_jax.evaluation.main import load_run
    from speechlm_jax.evaluation.scoring import Scorer
    from speechlm_jax.train import config as config_lib

    workdir = Path(args.workdir)
    folder = workdir / tag
    before = workdir / "probe_before"
    settings = {
        "run": storage.absolute(run),
        "probe_size": args.probe_size,
        "prefix_fraction": args.prefix_fraction,
        "seed": args.seed,
    }
    if _done(folder, settings, args.force):
        return
    texts = [r["text"] for r in _corpus(args)]
    assignments = _assignments(workdir)
    k = int(assignments.max()) + 1
    probes_path = before / "probes.json"
    if tag == "probe_before" and not probes_path.is_file():
        before.mkdir(parents=True, exist_ok=True)
        chosen = probe.choose_probes(assignments, k, args.probe_size, seed=args.seed)
        probes_path.write_text(json.dumps({str(c): v for c, v in chosen.items()}) + "\n")
    probes = {int(c): v for c, v in json.loads(_need(probes_path, "probe").read_text()).items()}
    manifest = probe.synthesize_probes(
        {i: texts[i] for v in probes.values() for i in v},
        before / "speech",
        prefix_fraction=args.prefix_fraction,
        workers=args.tts_workers,
    )
    mesh = _mesh(args)
    model, config, step = load_run(run, mesh)
    import_task_modules(tuple(config.data.task_modules) + tuple(args.task_modules))
    scorer = Scorer(
        model,
        load_tokenizer(config.data.tokenizer),
        downsample=int(config.model.projector.downsample),
        mesh=mesh,
        rules=config_lib.sharding_rules(config),
        batch_size=args.batch_size,
        speech=probe.ManifestSpeech(manifest),
    )
    scores = probe.score_clusters(scorer, probes, texts, folder, prefix_fraction=args.prefix_fraction)
    result = probe.cluster_misalignment(scores, k)
    result["step"] = step
    (folder / "clusters.json").write_text(json.dumps(result, indent=2) + "\n")
    _finish(folder, settings)


def stage_probe(args: argparse.Namespace) -> None:
    if not args.stage1:
        raise StageError("--stage1 (the stage-1 run) is required")
    _probe(args, "probe_before", args.stage1)


def stage_probe_after(args: argparse.Namespace) -> None:
    _probe(args, "probe_after", str(_need(Path(args.workdir) / "train" / "config.json", "train").parent))


def speech_seconds(sources: Sequence[Any]) -> float:
    """Total audio seconds of the pipeline's speech sources: each record's duration, else its file header."""
    from speechlm_jax.data.maker import record_seconds
    from speechlm_jax.data.mixture import open_speech_source

    total = 0.0
    for spec in sources:
        source = open_speech_source(dict(spec), "train")
        for i in range(len(source)):
            record = source[i]
            total += record_seconds(record)
    return total


def seconds_per_word(manifest: str | Path) -> float:
    """Audio seconds per word of a synthesised manifest (the estimate behind the budget)."""
    words = seconds = 0.0
    for line in storage.path(manifest).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            words += len(row["text"].split())
            seconds += float(row["duration"])
    if not words:
        raise StageError(f"{manifest} has no speech to estimate seconds per word from")
    return seconds / words


def stage_sample(args: argparse.Namespace) -> None:
    from speechlm_jax.train.restore import read_config as load_run_config

    workdir = Path(args.workdir)
    folder = workdir / "sample"
    settings = {
        "gamma": args.gamma,
        "budget_hours": args.budget_hours,
        "budget_fraction": args.budget_fraction,
        "seed": args.seed,
    }
    if _done(folder, settings, args.force):
        return
    records = _corpus(args)
    assignments = _assignments(workdir)
    k = int(assignments.max()) + 1
    m = np.asarray(json.loads(_need(workdir / "probe_before" / "clusters.json", "probe").read_text())["misalignment"])
    # A cluster without probe tokens is given the mean misalignment rather than none.
    m = np.where(np.isnan(m), np.nanmean(m), m)
    sizes = np.bincount(assignments, minlength=k)
    p = sample.target_distribution(sizes, m, args.gamma)
    stage1_seconds = (
        speech_seconds(load_run_config(args.stage1).data.speech_sources) if args.budget_fraction > 0 else 0.0
    )
    budget = sample.budget_seconds(
        hours=args.budget_hours, fraction=args.budget_fraction, stage1_seconds=stage1_seconds
    )
    rate = seconds_per_word(workdir / "probe_before" / "speech" / "manifest.jsonl")
    probes = json.loads((workdir / "probe_before" / "probes.json").read_text())
    exclude = [i for v in probes.values() for i in v]
    selection = sample.draw(
        assignments,
        p,
        sample.estimated_seconds([r["text"] for r in records], rate),
        budget,
        seed=args.seed,
        exclude=exclude,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "selected.jsonl", "w", encoding="utf-8") as f:
        for i, c in zip(selection.indices, selection.clusters):
            f.write(json.dumps({"id": records[i]["id"], "text": records[i]["text"], "cluster": int(c)}) + "\n")
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "p_target": p.tolist(),
                "misalignment": m.tolist(),
                "sizes": sizes.tolist(),
                "counts": np.bincount(selection.clusters, minlength=k).tolist(),
                "texts": len(selection.indices),
                "estimated_seconds": selection.seconds,
                "budget_seconds": budget,
                "stage1_seconds": stage1_seconds,
                "seconds_per_word": rate,
            },
            indent=2,
        )
        + "\n"
    )
    _finish(folder, settings)


def stage_synthesize(args: argparse.Namespace) -> None:
    from speechlm_jax.data.tts import Voice
    from speechlm_jax.data.tts_corpus import synthesize_corpus

    workdir = Path(args.workdir)
    folder = workdir / "synth"
    settings = {"seed": args.seed, "voices": args.voices}
    if _done(folder, settings, args.force):
        return
    lines = _need(workdir / "sample" / "selected.jsonl", "sample").read_text().splitlines()
    # A prefix keeps the new utterance ids apart from the stage-1 ones (teacher targets are keyed by id).
    items = [dict(row, id=f"select-{row['id']}") for row in map(json.loads, filter(str.strip, lines))]
    voices = [Voice(name=v) for v in args.voices.split(",")]
    result = synthesize_corpus(items, folder, voices=voices, workers=args.tts_workers, seed=args.seed, progress=True)
    print(result.summary(), file=sys.stderr)
    _finish(folder, dict(settings, seconds=result.seconds, failed=len(result.failed)))


def stage_targets(args: argparse.Namespace) -> None:
    from speechlm_jax.evaluation.targets import generate_targets
    from speechlm_jax.selection.stage2 import target_tasks
    from speechlm_jax.train.restore import read_config as load_run_config

    workdir = Path(args.workdir)
    folder = workdir / "targets"
    manifest = _need(workdir / "synth" / "done.json", "synthesize").parent / "manifest.jsonl"
    settings = {"stage1": storage.absolute(args.stage1), "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if _done(folder, settings, args.force):
        return
    config = load_run_config(args.stage1)
    tasks = target_tasks(config)
    if tasks:
        if not config.model.llm_weights:
            raise StageError(
                "the stage-1 mixture reads teacher targets but its LLM has no weights folder to generate them"
            )
        summary = generate_targets(
            llm=config.model.llm_weights,
            tokenizer=config.data.tokenizer,
            source={"type": "manifest", "path": str(manifest)},
            tasks=tuple(tasks),
            task_modules=tuple(config.data.task_modules) + tuple(args.task_modules),
            out=str(folder / "shards"),
            num_shards=1,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            dtype="float32",
            seed=args.seed,
            no_progress=True,
            mesh=parse_mesh(args.mesh),
        )
        print(json.dumps({"speechlm_generate": summary}), flush=True)
    _finish(folder, dict(settings, tasks=list(tasks)))


def _parse_set(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value read as JSON when it is JSON, else as a string."""
    key, sep, value = item.partition("=")
    if not sep:
        raise StageError(f"--set takes key=value, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def stage_train(args: argparse.Namespace) -> None:
    from speechlm_jax.selection import stage2

    workdir = Path(args.workdir)
    manifest = _need(workdir / "synth" / "done.json", "synthesize").parent / "manifest.jsonl"
    folder = workdir / "train"
    settings = {
        "stage1": storage.absolute(args.stage1),
        "stage1_step": args.stage1_step,
        "steps": args.steps,
        "repeat": args.repeat,
        "set": sorted(args.set),
    }
    marker = workdir / "train_done.json"
    if args.force:
        shutil.rmtree(folder, ignore_errors=True)
        marker.unlink(missing_ok=True)
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    overrides = dict(_parse_set(item) for item in args.set)
    if args.quiet:
        overrides["train.progress_bar"] = False
    targets_done = json.loads(_need(workdir / "targets" / "done.json", "targets").read_text())
    targets = (
        tuple(str(p) for p in sorted((workdir / "targets" / "shards").glob("*.jsonl"))) if targets_done["tasks"] else ()
    )
    result = stage2.continue_training(
        args.stage1,
        manifest,
        folder,
        steps=args.steps,
        start_step=args.stage1_step or None,
        repeat=args.repeat,
        targets=targets,
        overrides=overrides,
    )
    if result.reason == "done":
        marker.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def selection_summary(workdir: str | Path) -> dict[str, Any]:
    """The report's summary dict from the sample stage and the probes (M after when measured)."""
    workdir = Path(workdir)
    drawn = json.loads(_need(workdir / "sample" / "summary.json", "sample").read_text())
    before = json.loads((workdir / "probe_before" / "clusters.json").read_text())
    after_path = workdir / "probe_after" / "clusters.json"
    after = json.loads(after_path.read_text()) if after_path.is_file() else None
    synth = workdir / "synth" / "done.json"
    seconds = json.loads(synth.read_text())["seconds"] if synth.is_file() else drawn["estimated_seconds"]
    gamma = json.loads((workdir / "sample" / "done.json").read_text())["gamma"]
    summary = {
        "gamma": gamma,
        "budget_seconds": drawn["budget_seconds"],
        "selected_seconds": seconds,
        "selected_texts": drawn["texts"],
        "clusters": report.cluster_rows(
            drawn["sizes"],
            before["misalignment"],
            drawn["p_target"],
            drawn["counts"],
            after["misalignment"] if after else None,
        ),
        "overall": {"m_before": before["overall_misalignment"]},
    }
    if after:
        summary["overall"]["m_after"] = after["overall_misalignment"]
    return summary


def stage_report(args: argparse.Namespace) -> None:
    summary = selection_summary(args.workdir)
    paths = report.write_selection_report(summary, Path(args.workdir) / "report")
    if args.report_dir:
        report.merge_into_report(summary, args.report_dir, paths["plot"])
    print(json.dumps({"speechlm_select": {k: summary["overall"][k] for k in summary["overall"]}}), flush=True)


RUNNERS = {
    "embed": stage_embed,
    "cluster": stage_cluster,
    "probe": stage_probe,
    "sample": stage_sample,
    "synthesize": stage_synthesize,
    "targets": stage_targets,
    "train": stage_train,
    "probe_after": stage_probe_after,
    "report": stage_report,
}


PROG = "speechlm-select"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("stages", nargs="+", choices=(*STAGES, "all"), help="stages to run, in pipeline order")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--task_modules",
        type=cli.parse_list,
        default=(),
        help="comma-separated modules that register tasks (besides the stage-1 run's data.task_modules)",
    )
    p.add_argument("--corpus", default="", help="text corpus: JSONL ({'id', 'text'}) or plain lines")
    p.add_argument("--stage1", default="", help="the stage-1 SALAD run (workdir with config.json and checkpoints)")
    p.add_argument(
        "--stage1_step",
        type=int,
        default=0,
        help="stage-1 checkpoint to continue from (0: its last step before the learning-rate decay, else its latest)",
    )
    p.add_argument(
        "--embedder", default="", help="HF folder (decoder LLM: Flax; encoder: torch); default the stage-1 LLM"
    )
    p.add_argument("--shard_size", type=int, default=4096)
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--tolerance", type=float, default=0.05, help="cluster sizes within N/K (1 +- tolerance)")
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--no_normalize", action="store_true", help="cluster raw embeddings (default: unit-normalised)")
    p.add_argument("--probe_size", type=int, default=16, help="probe texts per cluster")
    p.add_argument("--prefix_fraction", type=float, default=0.5, help="spoken fraction of each probe text")
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--budget_hours", type=float, default=0.0)
    p.add_argument("--budget_fraction", type=float, default=0.0, help="of the stage-1 speech data (paper: 0.01)")
    p.add_argument("--voices", default="en-us", help="comma-separated eSpeak voices")
    p.add_argument("--tts_workers", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=128, help="teacher-target length (targets stage)")
    p.add_argument("--steps", type=int, default=1000, help="stage-2 optimiser steps")
    p.add_argument("--repeat", type=int, default=1, help="times the new manifest enters the mixture")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stage-2 config override, e.g. train.batch_size=16 (repeatable)",
    )
    p.add_argument("--report_dir", default="", help="an evaluation report folder to merge the summary into")
    p.add_argument("--mesh", default="data=-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo the named stages from scratch")
    p.add_argument("--quiet", action="store_true", help="no progress bar in the train stage")
    return p


def run_stages(stages: Sequence[str], **options: Any) -> None:
    """`speechlm-select` from Python: runs `stages` (or "all") in pipeline order; the keyword
    arguments are the command's flags (`workdir=..., gamma=5.0, set=["k=v"]`), defaults as there."""
    unknown = sorted(set(stages) - {*STAGES, "all"})
    if unknown:
        raise StageError(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    defaults = {a.dest: a.default for a in build_parser()._actions if a.dest not in ("help", "stages")}
    extra = sorted(set(options) - set(defaults))
    if extra:
        raise TypeError(f"run_stages() got unknown options {extra}")
    args = argparse.Namespace(**{**defaults, **options, "stages": list(stages)})
    if problem := storage.path_problem(args.workdir):
        raise StageError(f"--workdir {problem}")
    # A workdir in an object store is worked on in a local copy (the stages' TTS, embedding shards
    # and the trainer's stage-2 run write local files), pulled first and pushed after each stage.
    working = storage.SyncedDir(args.workdir, pull=True)
    args.workdir = str(working.local)
    try:
        for stage in STAGES if "all" in stages else [s for s in STAGES if s in stages]:
            RUNNERS[stage](args)
            working.sync()
    finally:
        working.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-select`); returns the exit status."""

    def body() -> None:
        args = build_parser().parse_args(argv)
        if not flags.FLAGS.is_parsed():
            flags.FLAGS(sys.argv[:1])  # the train stage's Grain worker processes (data.num_workers) read absl flags
        run_stages(args.stages, **{k: v for k, v in vars(args).items() if k != "stages"})

    return cli.run_command(PROG, body, (StageError, stage_cache.StageChanged))


if __name__ == "__main__":
    sys.exit(main())
