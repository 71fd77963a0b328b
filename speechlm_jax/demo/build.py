"""The demo's stages, each cached in `<out>/<stage>/` behind a done-marker keyed by its inputs.

    corpus    train / held-out sentences, the word-level tokenizer, the teacher's text SFT data
              and its copying sequences
    speech    the sentences spoken by eSpeak in several voices, rates and pitches (word timings)
    teacher   the text LLM trained from scratch on every toy task (the project's trainer),
              exported as an HF folder: the frozen LLM of every recipe
    encoder   the Whisper-architecture encoder pretrained with CTC (encoder + projector + a
              small decoder's head, all trainable), exported alone as an HF folder
    align     connector alignment (`configs/align.py:toy`): CTC of encoder + projector through
              the frozen teacher's own head; every recipe starts from it
    targets   the teacher's own answers on the training speech's transcripts (`speechlm-generate`)
    recipe/*  each recipe's `configs/<recipe>.py:toy` run of the trainer
    eval/*    `speechlm-eval`: the encoder's CTC readout (WER, CER), the teacher (text), the
              cascade (the aligned connector's transcript answered by the teacher) and each
              recipe (speech, text, WER)

A stage's key is a hash of what it reads: its own settings (configs as dicts, sizes,
voices) and the keys of the stages it builds on. `<out>/<stage>/.done` holds the key of
the finished stage; a rerun with the same key skips it, a different key (or no marker)
removes the folder and builds it again, so an interrupted stage never counts as done.
Nothing here trains, evaluates or synthesises by itself: every stage calls the project's
own trainer (`train.trainer.train`), evaluation (`evaluation.main`), generation
(`evaluation.targets`), TTS (`data.tts_corpus`) and export (`convert`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from speechlm_jax import stages
from speechlm_jax.configs import toyworld as toy_config
from speechlm_jax.convert import export
from speechlm_jax.convert import workdir as run_workdir
from speechlm_jax.data.tts import Voice, voice_grid
from speechlm_jax.toyworld import corpus as toy_corpus
from speechlm_jax.toyworld import sentences as toy_sentences
from speechlm_jax.toyworld.tasks import HELDOUT_TASKS, SEEN_TASKS, TOY_TASKS

RECIPES = ("asr", "mtbi", "salad", "vtb")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big the world is; the demo uses `configs.toyworld`'s values, the tests smaller ones."""

    train_sentences: int = toy_config.TRAIN_SENTENCES
    encoder_sentences: int = toy_config.ENCODER_SENTENCES  # heard by the encoder's pretraining alone
    heldout_sentences: int = toy_config.HELDOUT_SENTENCES
    voices: tuple[Voice, ...] = tuple(
        voice_grid(toy_config.VOICE_NAMES, toy_config.VOICE_RATES, toy_config.VOICE_PITCHES)
    )
    # Times each task is asked per training sentence in the teacher's data (others: once).
    asks: tuple[tuple[str, int], ...] = tuple(toy_config.TEXT_SFT_ASKS.items())
    copy_sequences: int = toy_config.COPY_SEQUENCES  # the teacher's copying rows (`copy_lm.jsonl`)
    # SALAD's stage 2 (`build_stage2`): the web corpus, its clusters and probe texts per cluster.
    stage2_corpus: int = toy_config.STAGE2_CORPUS
    stage2_clusters: int = toy_config.STAGE2_CLUSTERS
    stage2_probes: int = toy_config.STAGE2_PROBES
    seed: int = 0


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A config as plain JSON-able data (what its stage key hashes)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


class Stages:
    """Runs stages under `out`, skipping those finished with the same key (`speechlm_jax.stages`).

    A stage's key hashes its spec and the keys of the stages it builds on; a changed key
    rebuilds the stage. `timings` holds the seconds each stage took to build (in this process,
    or read back from its done-marker for a cached one); `cached` names the stages found
    finished from an earlier run (not those a worker process of this run built, `built_elsewhere`).
    """

    def __init__(self, out: str | Path, *, log: Callable[[str], None] = print):
        self.out = Path(out).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.keys: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.cached: list[str] = []
        self.built_elsewhere: set[str] = set()

    def folder(self, name: str) -> Path:
        return self.out / name

    def key(self, name: str, spec: Any, deps: Sequence[str]) -> str:
        """Stage `name`'s key (recorded for the stages that build on it), without building it."""
        self.keys[name] = _key(name, spec, [self.keys[d] for d in deps])
        return self.keys[name]

    def done(self, name: str) -> bool:
        """Whether stage `name` (its key already computed) is finished with that key."""
        finished = stages.record(self.folder(name))
        return finished is not None and finished.get("key") == self.keys[name]

    def run(self, name: str, spec: Any, deps: Sequence[str], fn: Callable[[Path], None]) -> Path:
        """Builds stage `name` with `fn(folder)` unless it is done with key(spec, deps' keys)."""
        key = self.key(name, spec, deps)
        folder = self.folder(name)
        if stages.finished(folder, {"key": key}, on_change="rebuild"):
            self.timings[name] = float(stages.record(folder).get("seconds", 0.0))
            if name not in self.built_elsewhere:
                self.log(f"[{name}] cached")
                self.cached.append(name)
            return folder
        if folder.exists():  # an interrupted build
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.log(f"[{name}] building")
        start = time.perf_counter()
        fn(folder)
        self.timings[name] = time.perf_counter() - start
        stages.finish(folder, {"key": key}, seconds=self.timings[name])
        self.log(f"[{name}] done in {self.timings[name]:.1f} s")
        return folder


# --- corpus


def task_spec() -> dict[str, Any]:
    """The toy tasks' phrasings (a change of any invalidates the corpus)."""
    return {t.name: [list(t.prompts_train), list(t.prompts_heldout)] for t in TOY_TASKS}


def build_corpus(folder: Path, sizes: Sizes) -> None:
    """Sentences, the tokenizer and the teacher's text data (every task, train phrasings; the copying rows)."""
    toy_corpus.build_corpus(
        folder,
        train_sentences=sizes.train_sentences,
        heldout_sentences=sizes.heldout_sentences,
        seed=sizes.seed,
        asks=dict(sizes.asks),
        copy_sequences=sizes.copy_sequences,
        encoder_sentences=sizes.encoder_sentences,
    )


# --- speech


def build_speech(folder: Path, corpus: Path, sizes: Sizes, *, workers: int = 2) -> None:
    """The train and held-out sentences spoken, one voice per utterance (hash of its id)."""
    toy_corpus.speak(corpus, folder, sizes.voices, workers=workers, seed=sizes.seed, progress=True)


# --- teacher and encoder: trainer runs, exported as HF folders


class Interrupted(RuntimeError):
    """A training run stopped before its last step (SIGTERM); its stage must not count as done."""


def train_run(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:
    """One run of the project's trainer; returns its last logged metrics.

    A preempted run (SIGTERM) has saved its checkpoint and returned early: raise, so the
    stage stays unfinished.
    """
    from speechlm_jax.train import trainer

    result = trainer.train(config, workdir)
    if result.reason != "done":
        raise Interrupted(f"training in {workdir} stopped at step {result.step} ({result.reason})")
    return result.metrics


def export_teacher(run: Path, out: Path) -> Path:
    """The trained LLM of a teacher run as its `*ForCausalLM` folder, with the tokenizer."""
    loaded = run_workdir.load_workdir(run)
    return export.export_llm(loaded.model.llm, out, tokenizer_dir=loaded.tokenizer_dir)


def export_encoder(run: Path, out: Path) -> Path:
    """The trained encoder of an ASR run as a WhisperModel-layout folder (`encoder.*` keys)."""
    encoder = run_workdir.load_workdir(run).model.encoder
    with export.staged_folder(out) as folder:
        export.write_whisper_encoder(encoder, folder)
    return out


# --- SALAD stage 2


def transcripts(manifest: str | Path) -> set[str]:
    """The transcripts of a speech manifest, whitespace-normalised."""
    lines = Path(manifest).read_text(encoding="utf-8").splitlines()
    return {" ".join(json.loads(line)["text"].split()) for line in lines if line.strip()}


def heard_transcripts(manifests: Sequence[str | Path]) -> set[str]:
    """The transcripts of every manifest in `manifests` that exists: what some part of the model heard."""
    return set().union(*(transcripts(m) for m in manifests if Path(m).exists()))


def write_web_corpus(path: Path, seen: set[str], size: int, *, seed: int = 0) -> Path:
    """Stage 2's text corpus: `size` toy training sentences not in `seen` (the stage-1 speech), as JSONL."""
    fresh = [s for s in toy_sentences.sentences("train", size * 4 + len(seen), seed=seed) if s not in seen][:size]
    if len(fresh) < size:
        raise ValueError(f"only {len(fresh)} toy training sentences are not in the stage-1 speech; ask fewer")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"t{i:05d}", "text": t}) + "\n" for i, t in enumerate(fresh)))
    return path


def stage2_options(stage1: str | Path, corpus: str | Path, sizes: Sizes) -> dict[str, Any]:
    """`speechlm-select`'s settings for stage 2 on a toy stage-1 SALAD run (`configs.toyworld`'s STAGE2_*)."""
    return dict(
        corpus=str(corpus),
        stage1=str(stage1),
        clusters=sizes.stage2_clusters,
        tolerance=0.1,
        probe_size=sizes.stage2_probes,
        budget_fraction=toy_config.STAGE2_BUDGET_FRACTION,
        steps=toy_config.STAGE2_STEPS,
        repeat=toy_config.STAGE2_REPEAT,
        batch_size=32,
        quiet=True,
        max_new_tokens=16,
    )


def build_stage2(
    folder: Path, stage1: Path, speech: str | Path, sizes: Sizes, *, workers: int = 2, heard: Sequence[str | Path] = ()
) -> Path:
    """SALAD's stage 2 on the stage-1 run `stage1` (one seed, active selection); returns its run folder.

    Its web corpus holds no sentence of the stage-1 speech manifest `speech`, nor of the `heard`
    manifests that exist (the encoder's own pretraining speech): its texts are new to every part."""
    from speechlm_jax.selection import main as select

    seen = transcripts(speech) | heard_transcripts(heard)
    corpus = write_web_corpus(folder / "corpus.jsonl", seen, sizes.stage2_corpus, seed=sizes.seed)
    select.run_stages(
        ["embed", "cluster", "probe", "sample", "synthesize", "targets", "train"],
        workdir=str(folder),
        gamma=toy_config.STAGE2_GAMMA,
        seed=sizes.seed,
        tts_workers=workers,
        **stage2_options(stage1, corpus, sizes),
    )
    return folder / "train"


# --- teacher targets


def build_targets(
    folder: Path,
    teacher: str,
    manifest: str,
    *,
    tasks: Sequence[str] = SEEN_TASKS,
    prompts_per_example: int = 1,
    batch_size: int = 128,
) -> dict[str, Any]:
    """The teacher's greedy answers to seen tasks about every training transcript."""
    from speechlm_jax.evaluation.targets import generate_targets

    return generate_targets(
        llm=teacher,
        source={"type": "manifest", "path": str(manifest)},
        tasks=tuple(tasks),
        out=str(folder),
        num_shards=toy_config.TARGET_SHARDS,
        batch_size=batch_size,
        max_new_tokens=16,
        prompts_per_example=prompts_per_example,
        dtype="float32",
        mesh={"data": -1},
    )


# --- recipes and evaluation


def recipe_config(name: str, out: str | Path) -> ml_collections.ConfigDict:
    """`configs/<name>.py:toy` for the demo folder `out` (the recipe's own toy variant)."""
    from speechlm_jax.train.config import load_config_file

    root = Path(toy_config.__file__).parent
    return load_config_file(f"{root / name}.py:toy,out={Path(out).absolute()}")


def evaluate(
    out: Path,
    *,
    workdir: str | None = None,
    base: str | None = None,
    sentences: int,
    asr: bool = False,
    ctc_asr: bool = False,
    cascade: bool = False,
    tasks: bool = True,
    diagnostics: bool = True,
    asr_limit: int = toy_config.ASR_EVAL_UTTERANCES,
    batch_size: int = 64,
    corpus_sentences: int | None = None,
) -> dict[str, Any]:
    """`speechlm-eval` of a run (or of a base LLM alone) into `out`; returns its report dict.

    The toy world's benchmark (`tasks`): `sentences` held-out sentences per task for prompt
    and task generalisation (seen tasks in train and held-out phrasings, held-out tasks),
    another `corpus_sentences` (default `sentences`) held-out sentences for SALAD's M and F
    (`diagnostics`, a run only). `asr`: the run's generated
    transcripts; `ctc_asr`: its greedy CTC transcripts (WER/CER, `asr_limit` held-out
    utterances); `cascade`: its CTC transcripts answered by the base LLM on the same items.
    """
    from speechlm_jax.evaluation.main import evaluate as run_eval

    out.mkdir(parents=True, exist_ok=True)
    benchmark = {}
    if tasks:
        (out / "sentences.txt").write_text("\n".join(toy_sentences.sentences("heldout", sentences, seed=0)) + "\n")
        corpus = toy_sentences.sentences("heldout", corpus_sentences or sentences, seed=1)
        (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
        benchmark = dict(
            generalisation=str(out / "sentences.txt"),
            seen_tasks=tuple(SEEN_TASKS),
            heldout_tasks=tuple(HELDOUT_TASKS),
            corpus=str(out / "corpus.txt") if workdir and diagnostics else "",
        )
    return run_eval(
        workdir=workdir or None,
        base=None if workdir else str(base),
        out=str(out),
        task_modules=(toy_config.TASK_MODULE,),
        batch_size=batch_size,
        max_new_tokens=16,
        mesh={"data": -1},
        asr=asr,
        ctc_asr=ctc_asr,
        cascade=cascade,
        asr_limit=asr_limit,
        **benchmark,
    )
