"""`make demo`: the toy world end to end, and what it shows about the recipes.

    python -m speechlm_jax.demo.main [--out demo_out] [--recipes asr,mtbi,salad,vtb]

Builds every stage of `speechlm_jax.demo.build` (each cached, so a second run only
reports), then prints and writes the table the design asks for:

    teacher   text accuracy (every toy task, train phrasings, held-out sentences)
    recipe    speech accuracy on seen tasks / train phrasings, seen tasks / held-out
              phrasings and held-out tasks; the gap (teacher text - speech) on held-out
              tasks; text retention (text accuracy with the adapter on); WER
    salad+stage2  SALAD's stage 2 on the salad run (`speechlm-select`, one seed, active
              selection: `configs.toyworld`'s STAGE2_*), whenever salad is built

into `<out>/report.json` (keys `teacher.text_acc`, `recipes.<name>.speech_acc_seen`,
`.speech_acc_heldout_prompts`, `.speech_acc_heldout_tasks`, `.gap_heldout_tasks`,
`.text_retention`, `.wer`), `<out>/report.md` and two plots. Each recipe's full
`speechlm-eval` report (per task, per item, training curves) is in `<out>/eval/<recipe>/`.

`report.json` also holds `checks`: each target of the toy world (teacher >= 95%, gap on
held-out tasks <= 10 points for mtbi and salad, asr >= 30 points below them on held-out
tasks, retention within 2 points of the teacher) with the measured value and whether it
holds. They are reported, never enforced: a negative result is a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from speechlm_jax import cli

RECIPES = ("asr", "mtbi", "salad", "vtb")
# SALAD's stage 2 (`speechlm-select`) on the salad run, built whenever salad is: its folder and row.
STAGE2 = "stage2/salad"
STAGE2_ROW = "salad+stage2"
SPLIT_KEYS = {
    "seen_tasks/train_prompts": "speech_acc_seen",
    "seen_tasks/heldout_prompts": "speech_acc_heldout_prompts",
    "heldout_tasks": "speech_acc_heldout_tasks",
}
TEACHER_TARGET = 0.95
COPY_TASKS = ("repeat", "reverse")
COPY_TARGET = 0.90
ENCODER_WER = 0.10
ASR_WER = 0.15
GAP_TARGET = 0.10
ASR_MARGIN = 0.30
RETENTION_TOLERANCE = 0.02
# Python packages the demo imports, with what each is for (a clear message when one is missing).
REQUIRED = {
    "jax": "JAX",
    "flax": "Flax NNX",
    "optax": "optax",
    "orbax.checkpoint": "orbax-checkpoint",
    "grain": "grain",
    "transformers": "transformers",
    "jinja2": "jinja2 (chat templates)",
    "ml_collections": "ml-collections",
    "soundfile": "soundfile",
    "espeakng_loader": "espeakng-loader (the bundled eSpeak NG TTS)",
    "jiwer": "jiwer",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}


class MissingRequirement(RuntimeError):
    """Something the demo needs is not installed; the message says what and how to get it."""


def check_requirements() -> None:
    """Imports every package the demo needs and starts the TTS once; raises MissingRequirement."""
    missing = []
    for module, name in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingRequirement(
            f"missing Python packages: {', '.join(missing)}. Run `make demo` (it installs them into .venv) "
            "or `pip install -e .` in this environment."
        )
    from speechlm_jax.data.tts import EspeakSynthesizer, Voice

    try:
        EspeakSynthesizer().synthesize("the dog runs", Voice())
    except Exception as error:  # noqa: BLE001 - any failure here means no TTS; say so plainly
        raise MissingRequirement(
            f"the eSpeak NG speech synthesizer does not work here ({error}); "
            "reinstall espeakng-loader (`pip install --force-reinstall espeakng-loader`)"
        ) from error


# --- the report


def _weighted(splits: dict[str, Any], names: Sequence[str], condition: str) -> float:
    parts = [splits[n]["overall"] for n in names if n in splits]
    items = sum(p["items"] for p in parts)
    return sum(p[condition] * p["items"] for p in parts) / items


def teacher_scores(report: dict[str, Any]) -> dict[str, float]:
    """The teacher's text accuracy from its `speechlm-eval --base` report."""
    splits = report["generalisation"]
    return {
        "text_acc": _weighted(splits, ("seen_tasks/train_prompts", "heldout_tasks"), "text"),
        "text_acc_heldout_prompts": splits["seen_tasks/heldout_prompts"]["overall"]["text"],
        "tasks": {
            task: s["text"]
            for name in ("seen_tasks/train_prompts", "heldout_tasks")
            for task, s in splits[name]["tasks"].items()
        },
    }


def recipe_scores(report: dict[str, Any]) -> dict[str, float]:
    """A recipe's row of the table from its `speechlm-eval --workdir` report."""
    splits = report["generalisation"]
    row = {key: splits[split]["overall"]["speech"] for split, key in SPLIT_KEYS.items()}
    row["gap_heldout_tasks"] = splits["heldout_tasks"]["overall"]["gap"]
    row["gap_seen"] = splits["seen_tasks/train_prompts"]["overall"]["gap"]
    row["text_retention"] = report["retention"]["overall"]["text_adapted"]
    row["text_retention_drop"] = report["retention"]["overall"]["drop"]
    if "asr" in report:
        row["wer"] = report["asr"]["wer"]
    if "diagnostics" in report:
        row["misalignment_per_token"] = report["diagnostics"]["misalignment"]["per_token"]
        row["forgetting_per_token"] = report["diagnostics"]["forgetting"]["per_token"]
    row["heldout_tasks"] = {task: s["speech"] for task, s in splits["heldout_tasks"]["tasks"].items()}
    return row


def encoder_scores(report: dict[str, Any]) -> dict[str, float]:
    """The pretrained encoder's greedy CTC readout from its `speechlm-eval --ctc_asr` report."""
    return {key: report["ctc_asr"][key] for key in ("wer", "cer", "exact")}


def cascade_scores(report: dict[str, Any]) -> dict[str, float]:
    """The cascade's row (the aligned connector's CTC transcript answered by the teacher)."""
    row = {key: report["cascade"][split]["overall"]["cascade"] for split, key in SPLIT_KEYS.items()}
    row["wer"] = report["ctc_asr"]["wer"]
    text = report["generalisation"]["heldout_tasks"]["overall"]["text"]
    row["gap_heldout_tasks"] = text - row["speech_acc_heldout_tasks"]
    row["aligned"] = recipe_scores(report)  # the aligned connector itself, with no task data
    return row


def _check(name: str, value: float, ok: bool) -> dict[str, Any]:
    return {"check": name, "value": value, "ok": bool(ok)}


def checks(
    teacher: dict[str, float],
    recipes: dict[str, dict[str, Any]],
    encoder: dict[str, float] | None = None,
    cascade: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The toy world's targets, each with the measured value and whether it holds."""
    out = [
        _check(
            f"teacher text accuracy >= {TEACHER_TARGET:.0%}", teacher["text_acc"], teacher["text_acc"] >= TEACHER_TARGET
        )
    ]
    for task in COPY_TASKS:
        value = teacher["tasks"].get(task)
        if value is not None:
            out.append(_check(f"teacher {task} >= {COPY_TARGET:.0%}", value, value >= COPY_TARGET))
    if encoder is not None:
        out.append(_check(f"encoder CTC WER <= {ENCODER_WER:.0%}", encoder["wer"], encoder["wer"] <= ENCODER_WER))
    if "asr" in recipes and "wer" in recipes["asr"]:
        wer = recipes["asr"]["wer"]
        out.append(_check(f"asr recipe WER <= {ASR_WER:.0%}", wer, wer <= ASR_WER))
    for name in ("mtbi", "salad"):
        if name not in recipes:
            continue
        row = recipes[name]
        for key, split in (("gap_seen", "seen tasks"), ("gap_heldout_tasks", "held-out tasks")):
            out.append(
                _check(f"{name}: gap on {split} <= {GAP_TARGET * 100:.0f} points", row[key], row[key] <= GAP_TARGET)
            )
        if cascade is not None:
            margin = row["speech_acc_heldout_tasks"] - cascade["speech_acc_heldout_tasks"]
            out.append(_check(f"{name}: held-out-task speech accuracy >= the cascade's", margin, margin >= 0))
    if "asr" in recipes:
        for name in ("mtbi", "salad"):
            if name in recipes:
                margin = recipes[name]["speech_acc_heldout_tasks"] - recipes["asr"]["speech_acc_heldout_tasks"]
                out.append(
                    _check(
                        f"asr at least {ASR_MARGIN * 100:.0f} points below {name} on held-out tasks",
                        margin,
                        margin >= ASR_MARGIN,
                    )
                )
    for name, row in recipes.items():
        drop = row["text_retention_drop"]
        out.append(
            _check(
                f"{name}: text retention within {RETENTION_TOLERANCE * 100:.0f} points of the teacher",
                drop,
                abs(drop) <= RETENTION_TOLERANCE,
            )
        )
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _speech_row(label: str, r: dict[str, Any], *, retention: str, wer: str) -> str:
    """One speech model's row: its three speech accuracies and gap, then the given cells ("" blank)."""
    tail = "".join(f" {cell} |" if cell else " |" for cell in (retention, wer))
    return (
        f"| {label} | | {_pct(r['speech_acc_seen'])} | {_pct(r['speech_acc_heldout_prompts'])} | "
        f"{_pct(r['speech_acc_heldout_tasks'])} | {_pct(r['gap_heldout_tasks'])} |{tail}"
    )


def table(report: dict[str, Any]) -> str:
    """The demo's table as Markdown (also what the console shows)."""
    lines = [
        "| model | text acc | speech seen | speech held-out phrasings | speech held-out tasks | gap held-out "
        "tasks | text retention | WER |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (text LLM) | {_pct(report['teacher']['text_acc'])} | | | | | | |",
    ]
    if "cascade" in report:
        c = report["cascade"]
        lines.append(_speech_row("cascade (CTC transcript -> teacher)", c, retention="", wer=_pct(c["wer"])))
        a = c["aligned"]
        lines.append(
            _speech_row("aligned connector (CTC only, no task data)", a, retention=_pct(a["text_retention"]), wer="")
        )
    for name, r in report["recipes"].items():
        lines.append(_speech_row(name, r, retention=_pct(r["text_retention"]), wer=_pct(r.get("wer"))))
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """`report.md`: the table, the targets and the plots."""
    checks_md = "\n".join(
        f"- [{'x' if c['ok'] else ' '}] {c['check']}: measured {100 * c['value']:.1f}" for c in report["checks"]
    )
    timings = "\n".join(f"| {k} | {v:.1f} |" for k, v in report["timings"].items())
    return (
        "# Toy world: the text-speech gap, measured\n\n"
        "Accuracies in percent on held-out sentences (exact match of greedy answers); speech is eSpeak NG "
        "in the evaluation voice. Gap = teacher text accuracy - speech accuracy on the same items.\n\n"
        f"{table(report)}\n\n## Targets\n\n{checks_md}\n\n"
        "![accuracy](accuracy.png)\n\n![retention](retention.png)\n\n"
        f"## Stage build times (seconds)\n\n| stage | s |\n|---|---|\n{timings}\n\n"
        f"This run: {report['seconds_this_run']:.0f} s; cached stages: {', '.join(report['cached']) or 'none'}.\n"
    )


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Speech accuracy per split and recipe against the teacher's text accuracy; retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["recipes"])
    keys = list(SPLIT_KEYS.values())
    labels = ("seen tasks", "held-out phrasings", "held-out tasks")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(zip(keys, labels)):
        heights = [100 * report["recipes"][n][key] for n in names]
        ax.bar([i + k * width for i in range(len(names))], heights, width, label=label)
    ax.axhline(100 * report["teacher"]["text_acc"], color="black", linestyle="--", linewidth=1, label="teacher (text)")
    ax.set_xticks([i + width for i in range(len(names))], names)
    ax.set_ylabel("speech accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    accuracy = out / "accuracy.png"
    fig.savefig(accuracy, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [100 * report["recipes"][n]["text_retention"] for n in names], color="tab:green")
    ax.axhline(100 * report["teacher"]["text_acc"], color="black", linestyle="--", linewidth=1, label="teacher (text)")
    ax.set_ylabel("text accuracy, adapter on (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    retention = out / "retention.png"
    fig.savefig(retention, dpi=120)
    plt.close(fig)
    return [accuracy, retention]


# --- the demo


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the demo: `build(folder)` makes it; its key hashes `spec` and `deps`' keys."""

    name: str
    spec: Any
    deps: tuple[str, ...]
    build: Callable[[Path], Any]


def plan(out: Path, recipes: Sequence[str], sizes: Any, eval_sentences: int, *, speakers: int = 2) -> list[Stage]:
    """Every stage of the demo in an order that builds each after the stages it reads.

    `speakers`: the synthesis processes of the speech stage (1 in a worker beside another).
    """
    from speechlm_jax.configs import toyworld as toy_config
    from speechlm_jax.demo import build

    p = toy_config.paths(out)
    sizes_spec = json.loads(json.dumps(dataclasses.asdict(sizes), default=str))
    teacher_config = toy_config.teacher(out)
    encoder_config = toy_config.encoder_pretrain(out)
    align_config = build.recipe_config("align", out)
    readout = {"utterances": sizes.heldout_sentences}
    eval_spec = {"sentences": eval_sentences, "asr": toy_config.ASR_EVAL_UTTERANCES}

    def teacher(folder: Path) -> None:
        build.train_run(teacher_config, folder / "run")
        build.export_teacher(folder / "run", folder / "hf")

    def encoder(folder: Path) -> None:
        build.train_run(encoder_config, folder / "run")
        build.export_encoder(folder / "run", folder / "hf")

    steps = [
        Stage("corpus", {"sizes": sizes_spec, "tasks": build.task_spec()}, (), lambda f: build.build_corpus(f, sizes)),
        Stage(
            "speech",
            {"voices": [v.key for v in sizes.voices]},
            ("corpus",),
            lambda f: build.build_speech(f, out / "corpus", sizes, workers=speakers),
        ),
        Stage("teacher", build.config_dict(teacher_config), ("corpus",), teacher),
        Stage(
            "targets",
            {"shards": toy_config.TARGET_SHARDS},
            ("teacher", "speech"),
            lambda f: build.build_targets(f / "shards", p["teacher"], p["speech"]),
        ),
        Stage(
            "eval/teacher",
            eval_spec,
            ("teacher",),
            lambda f: build.evaluate(f, base=p["teacher"], sentences=eval_sentences),
        ),
        Stage("encoder", build.config_dict(encoder_config), ("corpus", "speech"), encoder),
        Stage(
            "eval/encoder",
            readout,
            ("encoder",),
            lambda f: build.evaluate(
                f, workdir=p["encoder_run"], sentences=0, tasks=False, ctc_asr=True, asr_limit=sizes.heldout_sentences
            ),
        ),
        Stage(
            "align",
            build.config_dict(align_config),
            ("teacher", "encoder", "speech"),
            lambda f: build.train_run(align_config, f / "run"),
        ),
        Stage(
            "eval/align",
            {**eval_spec, **readout},
            ("align",),
            lambda f: build.evaluate(
                f,
                workdir=p["align"],
                sentences=eval_sentences,
                ctc_asr=True,
                cascade=True,
                diagnostics=False,
                asr_limit=sizes.heldout_sentences,
            ),
        ),
    ]
    for name in recipes:
        config = build.recipe_config(name, out)
        steps.append(
            Stage(
                f"recipe/{name}",
                build.config_dict(config),
                ("teacher", "align", "targets", "speech"),
                lambda f, c=config: build.train_run(c, f),
            )
        )
        steps.append(
            Stage(
                f"eval/{name}",
                eval_spec,
                (f"recipe/{name}",),
                lambda f, n=name: build.evaluate(
                    f, workdir=str(out / "recipe" / n), sentences=eval_sentences, asr=True
                ),
            )
        )
    if "salad" in recipes:
        # SALAD's stage 2 from the salad run's pre-decay checkpoint (one seed, active selection).
        stage2_spec = {
            "sizes": [sizes.stage2_corpus, sizes.stage2_clusters, sizes.stage2_probes, sizes.seed],
            "settings": {k: v for k, v in vars(toy_config).items() if k.startswith("STAGE2_")},
        }
        steps.append(
            Stage(
                STAGE2,
                stage2_spec,
                ("recipe/salad", "speech"),
                lambda f: build.build_stage2(
                    f, out / "recipe" / "salad", p["speech"], sizes, workers=speakers, heard=(p["speech_encoder"],)
                ),
            )
        )
        steps.append(
            Stage(
                f"eval/{STAGE2_ROW}",
                eval_spec,
                (STAGE2,),
                lambda f: build.evaluate(f, workdir=str(out / STAGE2 / "train"), sentences=eval_sentences, asr=True),
            )
        )
    return steps


def side_by_side(recipes: Sequence[str], jobs: int) -> list[list[list[str]]]:
    """The groups of stages that build at the same time, one worker process each.

    The text branch (the teacher, its targets, its evaluation) and the speech branch (the
    synthesised speech, the encoder and its readout) share only the transcripts the targets
    answer, which the text branch waits for (the speech is spoken long before the teacher is
    trained); after the alignment run, the recipes share nothing. Each inner list builds in
    plan order in one process.
    """
    workers = [[] for _ in range(min(jobs, len(recipes)) or 1)]
    for i, name in enumerate(recipes):
        workers[i % len(workers)] += [f"recipe/{name}", f"eval/{name}"]
        if name == "salad":  # stage 2 continues the salad run, in the same worker
            workers[i % len(workers)] += [STAGE2, f"eval/{STAGE2_ROW}"]
    return [[["teacher", "targets", "eval/teacher"], ["speech", "encoder", "eval/encoder"]], workers]


# One XLA thread per worker: these models are too small for XLA's intra-op threads to pay in
# full. On 2 cores the first phase took 332 s in two such workers, 380 s one stage at a time.
WORKER_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def run_workers(out: Path, recipes: Sequence[str], groups: Sequence[Sequence[str]], log: Callable[[str], None]) -> None:
    """Builds each group of stages in its own `speechlm-demo --only` process, all at once.

    A worker's output goes to `<out>/logs/<first stage>.log`. A worker waits for the stages
    it reads that another worker builds (`--wait`); a failed worker stops the others and
    fails the demo (the stages they did not finish stay unfinished, to build again).
    """
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {WORKER_XLA_FLAGS}".strip(),
        "PYTHONUNBUFFERED": "1",
    }
    running = []
    try:
        for group in groups:
            path = logs / f"{group[0].replace('/', '-')}.log"
            command = [sys.executable, "-m", "speechlm_jax.demo.main", "--out", str(out)]
            command += ["--recipes", ",".join(recipes), "--only", ",".join(group), "--wait"]
            log(f"[{', '.join(group)}] building in a worker (log: {path})")
            with open(path, "w") as handle:
                running.append(
                    (group, path, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env))
                )
        codes = [None]
        while None in codes and not any(codes):  # until all are done or one has failed
            time.sleep(0.5)
            codes = [proc.poll() for _, _, proc in running]
        failed = [(group, path, code) for (group, path, _), code in zip(running, codes) if code]
    finally:
        for _, _, proc in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if failed:
        raise cli.CommandFailed(
            "; ".join(f"stages {', '.join(g)} failed (exit {code}); see {path}" for g, path, code in failed)
        )


def run_demo(
    out: str | Path,
    recipes: Sequence[str] = RECIPES,
    *,
    sizes: Any = None,
    eval_sentences: int | None = None,
    jobs: int = 1,
    only: Sequence[str] | None = None,
    wait: bool = False,
) -> dict[str, Any] | None:
    """Builds every stage under `out` (cached), writes the reports; returns report.json's dict.

    `jobs` > 1 builds the independent branches (`side_by_side`) in that many worker
    processes at once (the demo's own sizes only: a worker rebuilds the plan from its
    command line). `only` builds just the named stages, the others' keys computed but
    nothing else done (what a worker runs); it returns None. A stage it builds needs the
    stages it reads finished: `wait` waits for those another worker builds, without it
    a missing one is an error.
    """
    from speechlm_jax.configs import toyworld as toy_config
    from speechlm_jax.demo import build

    if jobs > 1 and (sizes is not None or eval_sentences is not None):
        raise ValueError("jobs > 1 builds the demo's own sizes only (its workers read no sizes)")
    start = time.perf_counter()
    out = Path(out).absolute()
    sizes = sizes or build.Sizes()
    eval_sentences = eval_sentences or toy_config.EVAL_SENTENCES
    stages = build.Stages(out)
    # A worker's speech stage shares the cores with the other worker's training run.
    steps = plan(out, recipes, sizes, eval_sentences, speakers=1 if only is not None else 2)
    by_name = {s.name: s for s in steps}
    if only is not None:
        unknown = sorted(set(only) - set(by_name))
        if unknown:
            raise cli.UsageError(f"--only: no stages {unknown}; the demo's stages: {', '.join(s.name for s in steps)}")
        for s in steps:
            if s.name not in only:
                stages.key(s.name, s.spec, s.deps)
                continue
            for dep in s.deps:
                if dep not in only and not stages.done(dep):
                    if not wait:
                        raise cli.UsageError(f"--only {s.name}: it reads stage {dep}, which is not built")
                    stages.log(f"[{s.name}] waiting for {dep} (another worker builds it)")
                    while not stages.done(dep):
                        time.sleep(1.0)
            stages.run(s.name, s.spec, s.deps, s.build)
        return None
    phases = side_by_side(recipes, jobs) if jobs > 1 else []
    phase_of = {name: i for i, phase in enumerate(phases) for group in phase for name in group}
    launched = set()
    for position, s in enumerate(steps):
        i = phase_of.get(s.name)
        if i is not None and i not in launched:  # the phase's first stage: its groups build in workers
            launched.add(i)
            for t in steps[position:]:  # keys in plan order: a group may read another group's stage
                if phase_of.get(t.name) == i:
                    stages.key(t.name, t.spec, t.deps)
            pending = [group for group in phases[i] if not all(stages.done(name) for name in group)]
            if pending:
                run_workers(out, recipes, pending, stages.log)
                stages.built_elsewhere.update(name for group in pending for name in group)
        stages.run(s.name, s.spec, s.deps, s.build)

    rows = {name: recipe_scores(json.loads((out / "eval" / name / "report.json").read_text())) for name in recipes}
    if STAGE2 in by_name:
        rows[STAGE2_ROW] = recipe_scores(json.loads((out / "eval" / STAGE2_ROW / "report.json").read_text()))
    report = {
        "teacher": teacher_scores(json.loads((out / "eval" / "teacher" / "report.json").read_text())),
        "encoder": encoder_scores(json.loads((out / "eval" / "encoder" / "report.json").read_text())),
        "cascade": cascade_scores(json.loads((out / "eval" / "align" / "report.json").read_text())),
        "recipes": rows,
    }
    report["checks"] = checks(report["teacher"], rows, report["encoder"], report["cascade"])
    report["timings"] = dict(stages.timings)
    report["cached"] = stages.cached
    report["seconds_this_run"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out)
    (out / "report.md").write_text(markdown(report))
    return report


PROG = "speechlm-demo"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="the demo folder (stages are cached there)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of " + ",".join(RECIPES))
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes for the stages that build side by side (1: everything in this process)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated stages to build, nothing else (what each worker of --jobs runs); no report",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="with --only: wait for the stages they read that another worker builds (--jobs's workers do)",
    )
    return parser


def demo(
    out: str | Path = "demo_out",
    recipes: Sequence[str] = RECIPES,
    *,
    jobs: int = 2,
    only: Sequence[str] = (),
    wait: bool = False,
) -> dict[str, Any] | None:
    """Checks the requirements, builds and evaluates (`run_demo`), prints the table; returns report.json's dict
    (None with `only`: those stages built, nothing reported)."""
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise cli.UsageError(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    if jobs < 1:
        raise cli.UsageError(f"--jobs {jobs}: at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if only:
        run_demo(out, recipes, only=only, wait=wait)
        return None
    check_requirements()
    report = run_demo(out, recipes, jobs=jobs)
    print()
    print(table(report))
    print()
    for c in report["checks"]:
        print(f"[{'ok' if c['ok'] else 'MISSED'}] {c['check']}: {100 * c['value']:.1f}")
    print(f"\nreport: {Path(out).absolute() / 'report.md'} (this run {report['seconds_this_run']:.0f} s)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: builds, evaluates, prints the table; exit status 2 when something is missing."""

    def body() -> None:
        args = build_parser().parse_args(argv)
        only = [s for s in args.only.split(",") if s]
        if args.wait and not only:
            raise cli.UsageError("--wait: only with --only")
        demo(args.out, [r for r in args.recipes.split(",") if r], jobs=args.jobs, only=only, wait=args.wait)

    return cli.run_command(PROG, body, (MissingRequirement,))


if __name__ == "__main__":
    sys.exit(main())
