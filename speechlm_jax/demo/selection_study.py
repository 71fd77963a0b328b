"""SALAD stage 2 in the toy world: active selection against uniform selection, over seeds.

    python -m speechlm_jax.demo.selection_study --demo demo_out --out /tmp/select_study --seeds 8

It reads a finished demo folder (its teacher, pretrained encoder, speech and teacher targets)
and builds, cached under `--out` (each stage rebuilt only when what it reads changed):

    stage1/speech   the demo's speech minus every utterance about food (`--under_covered`):
                    the domain stage-1 speech does not cover (14% of toy sentences), as a
                    speech corpus without a field's vocabulary leaves its words unaligned
    stage1/align    the connector aligned on that speech (`configs/align.py:toy`)
    stage1/salad    stage-1 SALAD from it on the same speech (`configs/salad.py:toy`, whose
                    warmup-stable-decay schedule keeps the step-80 checkpoint before the decay)
    shared          the stage-2 "web" text: toy training sentences not in the stage-1 speech,
                    every domain at its natural share; embedded by the stage-1 LLM, balanced
                    k-means, each cluster's M probed (`speechlm-select embed cluster probe`)
    runs/g<gamma>/s<seed>
                    `speechlm-select sample synthesize targets train` at that gamma and seed:
                    P(c) ∝ P_web(c) M(c)^gamma (gamma 0 = uniform over the corpus), the same
                    budget of synthesised speech, stage 2 from the pre-decay checkpoint on the
                    stage-1 mixture plus the new speech, decaying to 0 (the same steps for all)
    eval/...        every run's held-out misalignment M and forgetting F (SALAD's diagnostics
                    on held-out toy sentences, and M on the held-out food sentences alone) and
                    its speech accuracy on the held-out tasks (`speechlm-eval`), the stage-1
                    model (no stage 2) included

The seed decides the drawn texts, the synthesis voices and the stage-2 data order; the
evaluation items are the same for every run, so runs of one seed are paired. Prints one
JSON line `{"selection_study": ...}` and writes `<out>/result.json` and `<out>/result.md`:
per arm the mean, standard deviation and the per-seed values, and paired t-tests of active
(the largest gamma) against uniform (gamma 0) and against no stage 2.
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

from speechlm_jax import cli, stages
from speechlm_jax.configs import toyworld as toy_config
from speechlm_jax.toyworld.sentences import parse, sentences

SHARED = ("embed", "cluster", "probe")  # `speechlm-select` stages; `probe` writes `probe_before`
SHARED_FOLDERS = ("embed", "cluster", "probe_before")
PER_RUN = ("sample", "synthesize", "targets", "train")
# The metrics of a run: (name, lower is better).
METRICS = (
    ("heldout_M", True),
    ("heldout_M_under_covered", True),
    ("heldout_F", True),
    ("speech_acc_heldout_tasks", False),
    ("speech_acc_seen", False),
)


def about(sentence: str, kind: str) -> bool:
    """Whether a toy sentence has a noun of `kind` (a `vocab` kind: animal, person, thing, food)."""
    return any(phrase.kind == kind for phrase in parse(sentence).noun_phrases)


def write_speech_without(manifest: Path, out: Path, kind: str) -> dict[str, int]:
    """The manifest's rows whose transcript is not about `kind`, written to `out`; the counts."""
    kept = dropped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if about(row["text"], kind):
                dropped += 1
            else:
                kept += 1
                # Relative audio paths are relative to the manifest's folder: keep them pointing there.
                row["audio"] = str((manifest.parent / row["audio"]).absolute())
                f.write(json.dumps(row) + "\n")
    if not kept or not dropped:
        raise cli.UsageError(f"{manifest}: {kept} utterances without {kind!r} and {dropped} with: need some of each")
    return {"kept": kept, "dropped": dropped}


def paired_test(a: Sequence[float], b: Sequence[float] | float, *, lower_is_better: bool) -> dict[str, Any]:
    """Two-sided paired t-test of a against b (per-seed values, or one value for every seed).

    `mean_difference` is mean(a - b); `wins` / `losses` count the seeds where a is better / worse.
    """
    from scipy import stats

    a = np.asarray(a, np.float64)
    diff = a - (np.full_like(a, float(b)) if np.isscalar(b) else np.asarray(b, np.float64))
    if diff.size != a.size:
        raise ValueError(f"{a.size} values against {diff.size}")
    constant = diff.size < 2 or bool(np.all(diff == diff[0]))
    p = float("nan") if constant else float(stats.ttest_1samp(diff, 0.0).pvalue)
    better = diff < 0 if lower_is_better else diff > 0
    worse = diff > 0 if lower_is_better else diff < 0
    return {"mean_difference": float(diff.mean()), "p": p, "wins": int(better.sum()), "losses": int(worse.sum())}


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values."""
    x = np.asarray(values, np.float64)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0, "values": x.tolist()}


class Study:
    """The study's stages under `out` (see the module docstring), cached with `demo.build.Stages`."""

    def __init__(self, args: argparse.Namespace):
        from speechlm_jax.demo import build

        self.args = args
        self.demo = Path(args.demo).absolute()
        self.out = Path(args.out).absolute()
        self.paths = toy_config.paths(self.demo)
        for name in ("speech", "encoder", "teacher", "targets"):
            if stages.record(self.demo / name) is None:
                raise cli.UsageError(f"--demo {self.demo}: its {name!r} stage is not built (run `make demo` first)")
        self.stages = build.Stages(self.out)
        # The demo's stages this study reads: a rebuilt demo rebuilds the study.
        self.demo_keys = {n: stages.record(self.demo / n)["key"] for n in ("speech", "encoder", "teacher", "targets")}
        self.cache = f"train.compilation_cache={self.out / 'xla_cache'}"
        self.speech = self.out / "stage1" / "speech" / "manifest.jsonl"  # the stage-1 speech

    # --- stage 1: a world whose stage-1 speech does not cover one domain

    def _recipe(self, name: str) -> Any:
        from speechlm_jax.demo import build

        config = build.recipe_config(name, self.demo)
        config.data.speech_sources = ({"type": "manifest", "path": str(self.speech)},)
        config.train.compilation_cache = str(self.out / "xla_cache")
        config.train.progress_bar = False
        return config

    def stage1(self) -> Path:
        from speechlm_jax.demo import build

        kind = self.args.under_covered
        self.stages.run(
            "stage1/speech",
            {"demo": self.demo_keys["speech"], "without": kind},
            (),
            lambda f: (f / "counts.json").write_text(
                json.dumps(write_speech_without(Path(self.paths["speech"]), self.speech, kind)) + "\n"
            ),
        )
        align = self._recipe("align")
        self.stages.run(
            "stage1/align",
            {"config": build.config_dict(align), "demo": self.demo_keys},
            ("stage1/speech",),
            lambda f: build.train_run(align, f / "run"),
        )
        salad = self._recipe("salad")
        salad.model.init_from.workdir = str(self.out / "stage1" / "align" / "run")
        self.stages.run(
            "stage1/salad",
            {"config": build.config_dict(salad), "demo": self.demo_keys},
            ("stage1/align",),
            lambda f: build.train_run(salad, f / "run"),
        )
        return self.out / "stage1" / "salad" / "run"

    # --- stage 2

    def _select_options(self, stage1: Path) -> dict[str, Any]:
        from speechlm_jax.demo import build

        a = self.args
        sizes = build.Sizes(stage2_corpus=a.corpus_size, stage2_clusters=a.clusters, stage2_probes=a.probe_size)
        options = build.stage2_options(stage1, self.out / "shared" / "corpus.jsonl", sizes)
        keys = ("tolerance", "budget_fraction", "steps", "repeat", "batch_size", "tts_workers")
        return options | {k: getattr(a, k) for k in keys}

    def shared(self, stage1: Path) -> Path:
        from speechlm_jax.demo import build
        from speechlm_jax.selection import main as select

        a = self.args
        folder = self.out / "shared"

        def build_shared(f: Path) -> None:
            # No sentence the stage-1 speech or the encoder's pretraining holds (as the demo's stage 2).
            heard = build.heard_transcripts((self.speech, self.paths["speech_encoder"]))
            build.write_web_corpus(f / "corpus.jsonl", heard, a.corpus_size, seed=a.seed)
            select.run_stages(
                list(SHARED), workdir=str(f), seed=a.seed, set=[self.cache], **self._select_options(stage1)
            )

        spec = {k: getattr(a, k) for k in ("corpus_size", "clusters", "tolerance", "probe_size", "seed")}
        self.stages.run("shared", spec, ("stage1/salad",), build_shared)
        return folder

    def stage2(self, stage1: Path, gamma: float, seed: int) -> Path:
        """One stage-2 run at `gamma` and `seed` from the shared clusters and probes; its workdir."""
        from speechlm_jax.selection import main as select

        a = self.args
        name = f"runs/g{gamma:g}/s{seed}"

        def build_run(f: Path) -> None:
            for part in SHARED_FOLDERS:  # the same corpus, clusters and probes: only the sampling differs
                shutil.copytree(self.out / "shared" / part, f / part)
            select.run_stages(
                list(PER_RUN),
                workdir=str(f),
                gamma=gamma,
                seed=seed,
                set=[self.cache, f"seed={seed}"],
                **self._select_options(stage1),
            )

        spec = {k: getattr(a, k) for k in ("budget_fraction", "steps", "repeat")} | {"gamma": gamma, "seed": seed}
        self.stages.run(name, spec, ("shared",), build_run)
        return self.out / name / "train"

    # --- evaluation

    def under_covered_items(self) -> Path:
        """Held-out sentences about the under-covered domain, for its own M (the rest: `build.evaluate`)."""
        a = self.args
        pool = sentences("heldout", 20 * a.heldout, seed=2)
        path = self.out / "eval_items" / f"{a.under_covered}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([s for s in pool if about(s, a.under_covered)][: a.heldout]) + "\n")
        return path

    def evaluate(self, name: str, run: Path, dep: str, under_covered: Path) -> dict[str, float]:
        from speechlm_jax.demo import build
        from speechlm_jax.demo.main import recipe_scores
        from speechlm_jax.evaluation.main import evaluate as run_eval

        a = self.args

        def build_eval(f: Path) -> None:
            # The demo's benchmark (tasks on `eval_sentences` held-out sentences each, M and F on
            # `heldout` others), then M on the under-covered domain's sentences alone.
            report = build.evaluate(f / "all", workdir=str(run), sentences=a.eval_sentences, corpus_sentences=a.heldout)
            domain = run_eval(
                workdir=str(run),
                out=str(f / "under_covered"),
                corpus=str(under_covered),
                task_modules=(toy_config.TASK_MODULE,),
                batch_size=64,
                max_new_tokens=16,
                mesh={"data": -1},
            )
            row = recipe_scores(report)
            scores = {
                "heldout_M": row["misalignment_per_token"],
                "heldout_F": row["forgetting_per_token"],
                "heldout_M_under_covered": domain["diagnostics"]["misalignment"]["per_token"],
                "speech_acc_heldout_tasks": row["speech_acc_heldout_tasks"],
                "speech_acc_seen": row["speech_acc_seen"],
                "text_retention": row["text_retention"],
            }
            (f / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")

        spec = {"sentences": a.eval_sentences, "heldout": a.heldout, "under_covered": a.under_covered}
        folder = self.stages.run(f"eval/{name}", spec, (dep,), build_eval)
        return json.loads((folder / "scores.json").read_text())


def _selection(run_dir: Path) -> dict[str, Any]:
    drawn = json.loads((run_dir / "sample" / "summary.json").read_text())
    return {"counts": drawn["counts"], "estimated_seconds": drawn["estimated_seconds"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    gammas = sorted({float(g) for g in args.gammas})
    if len(gammas) < 2 or gammas[0] != 0.0:
        raise cli.UsageError(f"--gammas {args.gammas}: need 0 (uniform) and at least one gamma > 0 (active)")
    if args.seeds < 1:
        raise cli.UsageError(f"--seeds {args.seeds}: at least 1")
    study = Study(args)
    stage1 = study.stage1()
    study.shared(stage1)
    under_covered = study.under_covered_items()
    clusters = json.loads((study.out / "shared" / "probe_before" / "clusters.json").read_text())
    corpus = [json.loads(line)["text"] for line in (study.out / "shared" / "corpus.jsonl").read_text().splitlines()]
    assignments = np.load(study.out / "shared" / "cluster" / "assignments.npy")
    covered = np.asarray([about(t, args.under_covered) for t in corpus])
    share = [float(covered[assignments == k].mean()) for k in range(len(clusters["misalignment"]))]

    arms: dict[str, dict[str, list[float]]] = {}
    selections: dict[str, list[dict[str, Any]]] = {}
    none = study.evaluate("stage1", stage1, "stage1/salad", under_covered)
    for gamma in gammas:
        arm = f"gamma={gamma:g}"
        for seed in range(args.seeds):
            workdir = study.stage2(stage1, gamma, seed)
            scores = study.evaluate(f"g{gamma:g}/s{seed}", workdir, f"runs/g{gamma:g}/s{seed}", under_covered)
            for key, value in scores.items():
                arms.setdefault(arm, {}).setdefault(key, []).append(value)
            selections.setdefault(arm, []).append(_selection(study.out / f"runs/g{gamma:g}/s{seed}"))

    result = analyse(none, arms, gammas)
    result |= {
        "under_covered": args.under_covered,
        "steps": args.steps,
        "budget_fraction": args.budget_fraction,
        "clusters": {
            "misalignment_before": clusters["misalignment"],
            "under_covered_share": share,
            "drawn_per_seed": {arm: [s["counts"] for s in v] for arm, v in selections.items()},
        },
    }
    (study.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (study.out / "result.md").write_text(markdown(result))
    print(markdown(result), file=sys.stderr)
    print(json.dumps({"selection_study": {k: v for k, v in result.items() if k != "clusters"}}), flush=True)
    return result


def analyse(none: dict[str, float], arms: dict[str, dict[str, list[float]]], gammas: Sequence[float]) -> dict[str, Any]:
    """Per arm the mean, sd and values of each metric; the paired tests; whether the target holds.

    `none`: the stage-1 model's scores; `arms["gamma=<g>"][metric]`: one value per seed.
    Active is the largest gamma, uniform gamma 0. The target: active lowers held-out M and
    raises held-out-task speech accuracy against uniform, each at p < 0.05.
    """
    active, uniform = f"gamma={max(gammas):g}", "gamma=0"
    result: dict[str, Any] = {
        "seeds": len(arms[active]["heldout_M"]),
        "gammas": list(gammas),
        "no_stage2": none,
        "arms": {arm: {k: summarise(v) for k, v in metrics.items()} for arm, metrics in arms.items()},
        "tests": {
            key: {
                "active_vs_uniform": paired_test(arms[active][key], arms[uniform][key], lower_is_better=lower),
                "active_vs_no_stage2": paired_test(arms[active][key], none[key], lower_is_better=lower),
            }
            for key, lower in METRICS
        },
    }
    m = result["tests"]["heldout_M"]["active_vs_uniform"]
    acc = result["tests"]["speech_acc_heldout_tasks"]["active_vs_uniform"]
    result["target_met"] = bool(
        m["mean_difference"] < 0 and m["p"] < 0.05 and acc["mean_difference"] > 0 and acc["p"] < 0.05
    )
    return result


def _fmt(key: str, value: float) -> str:
    return f"{100 * value:.1f}" if key.startswith("speech_acc") else f"{value:.4f}"


def markdown(result: dict[str, Any]) -> str:
    """The study's two tables: the arms (mean ± sd over seeds) and the paired tests."""
    keys = [k for k, _ in METRICS]
    lines = [
        f"Stage 2 over {result['seeds']} seeds ({result['steps']} steps, speech budget "
        f"{100 * result['budget_fraction']:g}% of stage 1's; stage-1 speech without {result['under_covered']!r}).",
        "",
        "| arm | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
        "| no stage 2 | " + " | ".join(_fmt(k, result["no_stage2"][k]) for k in keys) + " |",
    ]
    top = f"gamma={max(result['gammas']):g}"
    for arm, metrics in result["arms"].items():
        cells = [f"{_fmt(k, metrics[k]['mean'])} ± {_fmt(k, metrics[k]['sd'])}" for k in keys]
        label = {"gamma=0": "uniform (gamma=0)", top: f"active ({top})"}.get(arm, arm)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| metric | active - uniform | p | active better in | active - no stage 2 | p |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        t = result["tests"][key]
        u, n = t["active_vs_uniform"], t["active_vs_no_stage2"]
        scale = 100.0 if key.startswith("speech_acc") else 1.0
        lines.append(
            f"| {key} | {scale * u['mean_difference']:+.4g} | {u['p']:.3g} | {u['wins']} of {result['seeds']} "
            f"| {scale * n['mean_difference']:+.4g} | {n['p']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m speechlm_jax.demo.selection_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default=toy_config.DEMO_OUT, help="a finished demo folder (`make demo`)")
    p.add_argument("--out", required=True)
    p.add_argument("--under_covered", default="food", choices=("animal", "person", "thing", "food"))
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--gammas", type=cli.parse_list, default=("0", "1", "5"), help="comma-separated; 0 is uniform")
    p.add_argument("--corpus_size", type=int, default=toy_config.STAGE2_CORPUS)
    p.add_argument("--heldout", type=int, default=100, help="held-out sentences for M and F (and food ones for M)")
    p.add_argument("--eval_sentences", type=int, default=toy_config.EVAL_SENTENCES, help="per task")
    p.add_argument("--clusters", type=int, default=toy_config.STAGE2_CLUSTERS)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--probe_size", type=int, default=toy_config.STAGE2_PROBES)
    p.add_argument("--budget_fraction", type=float, default=toy_config.STAGE2_BUDGET_FRACTION)
    p.add_argument("--steps", type=int, default=toy_config.STAGE2_STEPS)
    p.add_argument("--repeat", type=int, default=toy_config.STAGE2_REPEAT)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tts_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the web corpus and the probes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (the result is in `<out>/result.json`)."""
    from speechlm_jax.selection import main as select

    return cli.run_command("selection_study", lambda: run(build_parser().parse_args(argv)), (select.StageError,))


if __name__ == "__main__":
    sys.exit(main())
