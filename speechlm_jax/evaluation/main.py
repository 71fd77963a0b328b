"""`speechlm-eval`: every benchmark of a trained run (or of a base LLM alone) into one report.

    speechlm-eval --workdir /tmp/run --items arc_spoken.jsonl --asr
    speechlm-eval --workdir /tmp/run --task_modules speechlm_jax.toyworld.tasks \
        --generalisation heldout.txt --heldout_tasks place,reverse --corpus other_heldout.txt
    speechlm-eval --base /ckpt/llama --tokenizer /ckpt/llama --items arc.jsonl --out /tmp/upper

A workdir is loaded as the trainer left it: its resolved `config.json` rebuilds the model
(`train.state.build_state`, frozen base from its source, cast to `model.frozen_dtype` as in
training), the latest checkpoint's trainable state is restored through the trainer's
orbax `Checkpointer`, and the frozen base's content hash is checked against the one the
checkpoint recorded. `--base` loads an HF LLM alone: text conditions only (the upper bound).
A workdir trained with W&B on (`train.wandb.project`) gets the report attached to its W&B run.

Benchmarks, each on when its input is given:
    --items a.jsonl,b.jsonl   gap benchmark, and text retention on the same items
    --generalisation file     prompt/task generalisation: every sentence of the file (lines, or
                              JSONL with "text") asked each of `--seen_tasks` (default: the
                              run's `data.tasks`) in train and held-out phrasings, and each of
                              `--heldout_tasks`; without --items, text retention on all of them
    --corpus file             SALAD's M and F on this text corpus (lines, or JSONL with "text")
    --asr / --asr_source      WER on the run's held-out speech (`data.eval_speech_sources`) or on
                              TYPE:PATH, the first `--asr_limit` utterances
    --ctc_asr                 WER / CER of the connector's own greedy CTC transcript (through the
                              LLM's head, blank `loss.blank_id`) on the same utterances
    --voicebench a,b=PATH     VoiceBench subsets from local copies (`voicebench.py`): openbookqa,
                              mmsu, bbh, ifeval, each as speech, as text and (with --cascade)
                              through the cascade, scored by VoiceBench's rules
    --cascade                 the cascade baseline on every item set above: the connector's CTC
                              transcript of the speech answered by the base LLM (`cascade.py`)
Tasks are named by the registry; `--task_modules` (and a run's `data.task_modules`) import
the modules that register them. `--oracle` replaces the speech by the transcript's own token
embeddings (a harness check: gap and M must come out 0). The report goes to `--out` (default: the workdir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from speechlm_jax import cli, storage
from speechlm_jax.cli import parse_list, parse_mesh, parse_source
from speechlm_jax.data.mixture import open_speech_source
from speechlm_jax.data.sources import read_text_corpus
from speechlm_jax.data.tasks import import_task_modules
from speechlm_jax.data.tokenizer import SpeechTokenizer, load_tokenizer
from speechlm_jax.evaluation import (
    asr,
    cascade,
    diagnostics,
    gap,
    generalisation,
    items,
    report,
    retention,
    voicebench,
)
from speechlm_jax.evaluation.scoring import SAMPLE_RATE, OracleSpeech, Scorer, TTSSpeech, model_audio, oracle_audio
from speechlm_jax.models import hf_import
from speechlm_jax.models.speechlm import SpeechLM
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import restore, wandb_run


def load_run(
    workdir: str | Path, mesh: jax.sharding.Mesh, step: int | None = None
) -> tuple[SpeechLM, ml_collections.ConfigDict, int]:
    """The trained SpeechLM of a workdir at `step` (default: the latest), its config and the step."""
    return restore.load_model(workdir, mesh=mesh, step=step)


def read_corpus(path: str | Path) -> list[str]:
    """Sentences of a text file (one per line) or a JSONL file with a "text" field."""
    return [record["text"] for record in read_text_corpus(path)]


PROG = "speechlm-eval"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """What `speechlm-eval` is asked: one field per flag (see `build_parser`), with its defaults."""

    workdir: str | None = None
    base: str | None = None
    tokenizer: str = ""
    out: str = ""
    items: Sequence[str] = ()
    task_modules: Sequence[str] = ()
    generalisation: str = ""
    seen_tasks: Sequence[str] | None = None
    heldout_tasks: Sequence[str] = ()
    corpus: str = ""
    prefix_fraction: float = 0.5
    asr: bool = False
    asr_source: dict[str, str] | None = None
    asr_limit: int = 200
    ctc_asr: bool = False
    cascade: bool = False
    voicebench: Sequence[str] = ()
    voicebench_limit: int = 0
    voicebench_max_new_tokens: int = 512
    oracle: bool = False
    batch_size: int = 16
    max_new_tokens: int = 32
    no_length_normalization: bool = False
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # The command line's comma-separated forms are accepted from Python too.
        for name in ("items", "task_modules", "heldout_tasks", "voicebench") + (
            ("seen_tasks",) if self.seen_tasks is not None else ()
        ):
            value = getattr(self, name)
            object.__setattr__(self, name, parse_list(value) if isinstance(value, str) else tuple(value))
        if isinstance(self.mesh, str):
            object.__setattr__(self, "mesh", parse_mesh(self.mesh))
        if isinstance(self.asr_source, str):
            object.__setattr__(self, "asr_source", parse_source(self.asr_source))


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="a training run (config.json + checkpoints/)")
    model.add_argument("--base", help="an HF LLM folder alone: the text upper bound")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: the run's, or --base)")
    p.add_argument("--out", default="", help="report folder (default: the workdir)")
    p.add_argument(
        "--items", type=parse_list, default=(), help="comma-separated item JSONL files (gap benchmark, retention)"
    )
    p.add_argument("--task_modules", type=parse_list, default=(), help="comma-separated modules that register tasks")
    p.add_argument("--generalisation", default="", help="sentences (lines or JSONL) for the generalisation benchmark")
    p.add_argument(
        "--seen_tasks", type=parse_list, default=None, help="comma-separated (default: the run's data.tasks)"
    )
    p.add_argument("--heldout_tasks", type=parse_list, default=(), help="comma-separated tasks no recipe trained on")
    p.add_argument("--corpus", default="", help="text corpus for SALAD's M and F")
    p.add_argument("--prefix_fraction", type=float, default=0.5, help="spoken fraction of each corpus sentence")
    p.add_argument("--asr", action="store_true", help="WER on the run's held-out speech sources")
    p.add_argument("--asr_source", type=parse_source, default=None, help="TYPE:PATH (manifest|librispeech)")
    p.add_argument("--asr_limit", type=int, default=200)
    p.add_argument("--ctc_asr", action="store_true", help="WER/CER of the run's greedy CTC transcripts")
    p.add_argument("--cascade", action="store_true", help="the run's CTC transcript answered by the base LLM")
    p.add_argument(
        "--voicebench",
        type=parse_list,
        default=(),
        help="comma-separated local VoiceBench subsets, SUBSET=PATH or a folder named by its subset "
        f"({', '.join(voicebench.SUBSETS)})",
    )
    p.add_argument("--voicebench_limit", type=int, default=0, help="the first N rows of each split (0: all)")
    p.add_argument("--voicebench_max_new_tokens", type=int, default=512, help="response length for VoiceBench")
    p.add_argument("--oracle", action="store_true", help="transcript token embeddings as the speech (harness check)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--no_length_normalization", action="store_true", help="rank options by summed log-prob")
    p.add_argument("--mesh", type=parse_mesh, default={"data": -1})
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="--base only: compute and parameter dtype")
    return p


def parse_request(argv: Sequence[str] | None = None) -> EvalRequest:
    """The command line of `speechlm-eval` as an EvalRequest (argparse exits on a bad flag)."""
    return EvalRequest(**vars(build_parser().parse_args(argv)))


def _asr_records(args: EvalRequest, config: ml_collections.ConfigDict | None) -> list[dict[str, Any]]:
    specs = [args.asr_source] if args.asr_source else list(config.data.eval_speech_sources) if config else []
    if not specs:
        raise cli.UsageError("--asr needs --asr_source or a run with data.eval_speech_sources")
    records = []
    for spec in specs:
        source = open_speech_source(dict(spec), "heldout")
        read = [source[i] for i in range(len(source))]
        # An item is a whole audio file: a segment's text scored against its whole recording would be wrong.
        if any(r.get("offset") is not None or r.get("channel") is not None or r.get("audio_bytes") for r in read):
            raise cli.UsageError(
                f"--asr scores whole audio files; the {spec['type']} source {spec['path']} names segments of "
                "recordings or audio inside a dataset (evaluate a manifest of whole files)"
            )
        records += read
    return [r for r in records if r.get("audio") and r.get("text")][: args.asr_limit]


def evaluate(**options: Any) -> dict[str, Any]:
    """`speechlm-eval` from Python: the keyword arguments are EvalRequest's fields; returns the report dict."""
    return run(EvalRequest(**options))


def _check_inputs(args: EvalRequest) -> None:
    if not args.workdir and not args.base:
        raise cli.UsageError("one of --workdir and --base is needed")
    if args.workdir and not (storage.path(args.workdir) / "config.json").is_file():
        raise cli.UsageError(f"--workdir {args.workdir}: no config.json (not a training run)")
    if args.base and not storage.path(args.base).is_dir():
        raise cli.UsageError(f"--base {args.base}: no such folder")
    if not args.out and not args.workdir:
        raise cli.UsageError("--out is required with --base")
    for flag, path in [("--items", p) for p in args.items] + [
        ("--generalisation", args.generalisation),
        ("--corpus", args.corpus),
    ]:
        if path and not storage.path(path).is_file():
            raise cli.UsageError(f"{flag} {path}: no such file")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The files a request names, read and checked before any model is loaded."""

    items: list[items.Item]
    sentences: list[str]
    corpus: list[str]
    voicebench: list[voicebench.Subset] = dataclasses.field(default_factory=list)


def _audio_limit(config: Any) -> dict[str, int]:
    """The Scorer's longest slot: the run's `data.max_audio_seconds` when it trained on long
    audio (a recording up to it is one audio span, as in training; longer ones are cut into
    slots of that length), else the Scorer's own default."""
    seconds = float(config.data.get("max_audio_seconds", 0.0))
    return {"max_audio_samples": int(seconds * SAMPLE_RATE)} if seconds > 0 else {}


def read_inputs(args: EvalRequest) -> Inputs:
    """Reads every item file (`ItemFileError` naming file and line, its audio decoded) and the
    generalisation and M/F corpora: a bad input fails here, in a second, not after the model loads."""
    _check_inputs(args)
    return Inputs(
        items=[it for path in args.items if path for it in items.load_items(path)],
        sentences=read_corpus(args.generalisation) if args.generalisation else [],
        corpus=read_corpus(args.corpus) if args.corpus else [],
        voicebench=[voicebench.read_subset(spec, limit=args.voicebench_limit) for spec in args.voicebench],
    )


def run(args: EvalRequest) -> dict[str, Any]:
    """Reads the inputs, loads the model, runs the asked benchmarks, writes the report; returns the report dict."""
    inputs = read_inputs(args)
    import_task_modules(args.task_modules)
    mesh = make_mesh(args.mesh)
    config = None
    if args.workdir:
        model, config, step = load_run(args.workdir, mesh)
        import_task_modules(config.data.task_modules)
        tokenizer: SpeechTokenizer = load_tokenizer(args.tokenizer or config.data.tokenizer)
        layout = {"downsample": int(config.model.projector.downsample), "rules": config_lib.sharding_rules(config)}
        layout.update(_audio_limit(config))
        info = {"workdir": str(args.workdir), "step": step, "recipe": config.recipe}
    else:
        model = hf_import.load_llm(args.base, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.dtype), mesh=mesh)
        tokenizer = load_tokenizer(args.tokenizer or args.base)
        layout = {}  # an LLM alone reads no audio
        info = {"base": str(args.base)}
    info["oracle"] = bool(args.oracle)
    if args.oracle and layout:
        speech = OracleSpeech(tokenizer, layout["downsample"])
    else:
        recorded = {key: w for subset in inputs.voicebench for key, w in subset.waveforms.items()}
        speech = voicebench.RecordedSpeech(recorded, TTSSpeech()) if recorded else None
    scorer = Scorer(
        model,
        tokenizer,
        mesh=mesh,
        batch_size=args.batch_size,
        **layout,
        speech=speech,
        embedder=oracle_audio if args.oracle else model_audio,
    )
    normalize = not args.no_length_normalization
    result: dict[str, Any] = {"model": info}
    asked = list(inputs.items)
    gap_items, generalisation_sets = list(asked), {}
    if asked:
        result["gap"] = gap.run_gap(scorer, asked, max_new_tokens=args.max_new_tokens, normalize=normalize)
    if args.generalisation:
        sentences = inputs.sentences
        seen = tuple(args.seen_tasks if args.seen_tasks is not None else config.data.tasks if config else ())
        if not seen and not args.heldout_tasks:
            raise cli.UsageError("--generalisation needs --seen_tasks or --heldout_tasks (or a run with data.tasks)")
        generalisation_sets = generalisation.generalisation_items(seen, args.heldout_tasks, sentences, seed=args.seed)
        result["generalisation"] = generalisation.run_generalisation(
            scorer, generalisation_sets, max_new_tokens=args.max_new_tokens
        )
        if not asked:
            # Without item files, text retention is measured on every task asked, in train phrasings.
            seen_split, _, heldout_split = generalisation.SPLITS
            asked = generalisation_sets[seen_split] + generalisation_sets[heldout_split]
    if asked and scorer.has_speech:
        result["retention"] = retention.run_retention(
            scorer, asked, max_new_tokens=args.max_new_tokens, normalize=normalize
        )
    corpus = inputs.corpus
    if corpus and scorer.has_speech:
        result["diagnostics"] = diagnostics.run_diagnostics(scorer, corpus, prefix_fraction=args.prefix_fraction)
    if (args.asr or args.asr_source) and scorer.has_speech:
        asked = asr.asr_items(_asr_records(args, config), seed=args.seed)
        result["asr"] = asr.run_asr(scorer, asked, max_new_tokens=args.max_new_tokens)
    if (args.ctc_asr or args.cascade) and not scorer.has_speech:
        raise ValueError("--ctc_asr and --cascade read a run's connector: give --workdir")
    if args.ctc_asr:
        result["ctc_asr"] = cascade.run_ctc_asr(scorer, _asr_records(args, config), blank_id=config.loss.blank_id)
    if inputs.voicebench:
        result["voicebench"] = {
            subset.name: voicebench.run_voicebench(
                scorer,
                subset,
                max_new_tokens=args.voicebench_max_new_tokens,
                blank_id=config.loss.blank_id if args.cascade else None,
                seed=args.seed,
            )
            for subset in inputs.voicebench
        }
    if args.cascade:
        sets = {"gap": gap_items} if gap_items else {}
        sets.update(generalisation_sets)
        result["cascade"] = {
            name: cascade.run_cascade(
                scorer, its, blank_id=config.loss.blank_id, max_new_tokens=args.max_new_tokens, normalize=normalize
            )
            for name, its in sets.items()
            if its
        }
    out = args.out or args.workdir
    if jax.process_index() == 0:
        paths = report.write_report(result, out, workdir=args.workdir)
        result["files"] = {name: str(p) for name, p in paths.items()}
        if config is not None:  # a workdir whose run logs to W&B gets the report attached
            wandb_run.attach_evaluation(config, args.workdir, paths, headline(result))
    return result


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The report's headline numbers (what `speechlm-eval` prints as one JSON line)."""
    numbers = {name: result[name]["overall"] for name in ("gap", "retention") if name in result}
    numbers.update({f"generalisation/{k}": v["overall"] for k, v in result.get("generalisation", {}).items()})
    if "diagnostics" in result:
        numbers["M_per_token"] = result["diagnostics"]["misalignment"]["per_token"]
        numbers["F_per_token"] = result["diagnostics"]["forgetting"]["per_token"]
    if "asr" in result:
        numbers["wer"] = result["asr"]["wer"]
    if "ctc_asr" in result:
        numbers["ctc_wer"], numbers["ctc_cer"] = result["ctc_asr"]["wer"], result["ctc_asr"]["cer"]
    numbers.update({f"cascade/{k}": v["overall"] for k, v in result.get("cascade", {}).items()})
    numbers.update(
        {
            f"voicebench/{k}": {
                c: v["overall"][c] for c in (*v["conditions"], "gap", "cascade_gap", "items") if c in v["overall"]
            }
            for k, v in result.get("voicebench", {}).items()
        }
    )
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-eval`); prints the headline numbers as one JSON line, returns the exit status."""

    def body() -> None:
        result = run(parse_request(argv))
        print(json.dumps({"speechlm_eval": headline(result)}), flush=True)

    return cli.run_command(PROG, body, (items.ItemFileError, voicebench.VoiceBenchError, config_lib.ConfigError))


if __name__ == "__main__":
    sys.exit(main())
