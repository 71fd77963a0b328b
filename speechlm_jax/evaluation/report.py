"""The evaluation report: `report.json`, `report.md` and matplotlib plots in the output folder.

`report.json` holds every number `speechlm-eval` measured (per-item answers included);
`report.md` is the human summary with tables and the plots:

    gap_per_task.png      text - speech accuracy per task (gap benchmark; without item files,
                          the toy tasks of the generalisation benchmark)
    text_vs_speech.png    text (base LLM) and speech accuracy side by side, per task and per
                          generalisation split
    training_curves.png   every scalar the trainer logged, read back from the TensorBoard
                          event files under `<workdir>/tensorboard/<split>/` (train and eval
                          curves of one tag share a panel)

Event files are read with TensorBoard's own `EventAccumulator`, the reader TensorBoard uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speechlm_jax import storage

Curves = dict[str, dict[str, list[tuple[int, float]]]]


def read_training_curves(workdir: storage.PathLike) -> Curves:
    """{split: {tag: [(step, value), ...]}} from the event files under `<workdir>/tensorboard/`
    (a workdir in an object store: its event files are copied to local disk first)."""
    from tensorboard.backend.event_processing import event_accumulator

    remote_root = storage.path(workdir) / "tensorboard"
    curves: Curves = {}
    if not remote_root.is_dir():
        return curves
    root = storage.local_copy(remote_root)
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        acc = event_accumulator.EventAccumulator(str(split_dir), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if tags:
            curves[split_dir.name] = {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in tags}
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gap(tasks: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Bar chart of the gap (text - speech accuracy) per task."""
    plt = _pyplot()
    names = sorted(tasks)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.5))
    ax.bar(names, [tasks[n]["gap"] for n in names], color="tab:red")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("gap (text - speech)")
    ax.set_title("Text-speech gap per task")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_text_vs_speech(groups: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Grouped bars: text (base LLM) and speech accuracy for each named group."""
    plt = _pyplot()
    names = list(groups)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 2), 3.5))
    ax.bar([i - 0.2 for i in x], [groups[n]["text"] for n in names], width=0.4, label="text (base LLM)")
    ax.bar([i + 0.2 for i in x], [groups[n]["speech"] for n in names], width=0.4, label="speech")
    ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(curves: Curves, path: Path) -> Path:
    """One panel per scalar tag, a line per split (train, eval) holding it."""
    plt = _pyplot()
    tags = sorted({tag for per_split in curves.values() for tag in per_split})
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for split, per_split in sorted(curves.items()):
            if tag in per_split:
                steps, values = zip(*per_split[tag])
                ax.plot(steps, values, label=split, marker="." if len(steps) < 20 else None)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(rows: Mapping[str, Mapping[str, Any]], columns: list[str], first: str) -> list[str]:
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(c, "")) for c in columns) + " |")
    return lines


def _score_table(section: Mapping[str, Any], columns: list[str]) -> list[str]:
    rows = {"**overall**": section["overall"], **section["tasks"]}
    return _table(rows, [c for c in columns if c in section["overall"]] + ["items"], "task")


def markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """The human summary of a report dict (see `write_report`)."""
    lines = ["# speechlm-eval report", ""]
    for key, value in report.get("model", {}).items():
        lines.append(f"- {key}: `{value}`")
    if "gap" in report:
        lines += [
            "",
            "## Text-speech gap",
            "",
            "Text: the base LLM (LoRA off) reading the question; speech: the speech LLM hearing it.",
            "",
        ]
        lines += _score_table(report["gap"], ["text", "speech", "gap"])
    if "generalisation" in report:
        lines += ["", "## Prompt and task generalisation", ""]
        rows = {split: section["overall"] for split, section in report["generalisation"].items()}
        lines += _table(
            rows, [c for c in ("text", "speech", "gap", "items") if c in next(iter(rows.values()))], "split"
        )
    if "retention" in report:
        lines += ["", "## Text retention", "", "Text input: base LLM (LoRA off) vs adapted model (LoRA on).", ""]
        lines += _score_table(report["retention"], ["text", "text_adapted", "drop"])
    if "diagnostics" in report:
        d = report["diagnostics"]
        lines += [
            "",
            "## SALAD diagnostics",
            "",
            f"On {d['sequences']} sentences, the first {d['prefix_fraction']:.0%} of the words spoken.",
            "",
        ]
        lines += _table(
            {"misalignment M": d["misalignment"], "forgetting F": d["forgetting"]},
            ["per_token", "per_sequence", "tokens"],
            "diagnostic",
        )
    if "asr" in report:
        a = report["asr"]
        lines += [
            "",
            "## ASR",
            "",
            f"WER {a['wer']:.4f} over {int(a['utterances'])} utterances "
            f"({int(a['words'])} words: {int(a['substitutions'])} substitutions, {int(a['deletions'])} deletions, "
            f"{int(a['insertions'])} insertions).",
        ]
    if "ctc_asr" in report:
        c = report["ctc_asr"]
        lines += [
            "",
            "## The connector's CTC transcripts",
            "",
            f"WER {c['wer']:.4f}, CER {c['cer']:.4f}, "
            f"{c['exact']:.1%} of {int(c['utterances'])} utterances exact (greedy CTC through the LLM's head).",
        ]
    if "cascade" in report:
        lines += [
            "",
            "## Cascade baseline",
            "",
            "The connector's CTC transcript of the speech, answered by the base LLM (LoRA off).",
            "",
        ]
        rows = {name: section["overall"] for name, section in report["cascade"].items()}
        lines += _table(rows, ["cascade", "wer", "items"], "item set")
    if "voicebench" in report:
        lines += voicebench_markdown(report["voicebench"])
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def voicebench_markdown(subsets: Mapping[str, Any]) -> list[str]:
    """The VoiceBench section: per subset (and per task of a subset with several), each condition's score."""
    lines = [
        "",
        "## VoiceBench",
        "",
        "Speech: the recording to the speech LLM; text: the prompt to the base LLM; cascade: the "
        "connector's CTC transcript to the base LLM; gap = text - speech, cascade_gap = cascade - speech. "
        "Scores are fractions (accuracy; IFEval the mean "
        "of its four accuracies); fail: the share of responses with no answer found (guessed).",
        "",
    ]
    rows: dict[str, dict[str, Any]] = {}
    for name, section in subsets.items():
        for row, values in [(f"**{name}**", section["overall"]), *section["tasks"].items()]:
            rows[row] = dict(values)
            for c in ("text", "speech", "cascade"):
                if "fail" in values.get(f"{c}_details", {}):
                    rows[row][f"{c} fail"] = values[f"{c}_details"]["fail"]
    columns = ["text", "speech", "gap", "cascade", "cascade_gap"]
    present = [c for c in columns if any(c in r for r in rows.values())]
    fails = [f"{c} fail" for c in ("text", "speech", "cascade") if any(f"{c} fail" in r for r in rows.values())]
    return lines + _table(rows, present + fails + ["items"], "subset")


def per_task_gaps(report: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    """Per-task text/speech/gap scores: the item files' tasks, else every toy task of the
    generalisation benchmark in its train phrasings (seen tasks and held-out tasks)."""
    gap = report.get("gap")
    if gap and "gap" in gap["overall"]:
        return dict(gap["tasks"])
    splits = report.get("generalisation", {})
    return {
        task: scores
        for split in ("seen_tasks/train_prompts", "heldout_tasks")
        if split in splits
        for task, scores in splits[split]["tasks"].items()
        if "gap" in scores
    }


def write_report(
    report: Mapping[str, Any], out_dir: storage.PathLike, *, workdir: storage.PathLike | None = None
) -> dict[str, Any]:
    """Writes report.json, report.md and the plots into `out_dir` (local or in an object store);
    returns their paths by name.

    `workdir` (a training run) adds the training curves from its event files.
    """
    folder = storage.SyncedDir(out_dir)
    try:
        written = _write_report(report, folder.local, workdir)
    finally:
        folder.close()
    target = storage.path(out_dir)
    return {name: target / path.name for name, path in written.items()}


def _write_report(report: Mapping[str, Any], out: Path, workdir: storage.PathLike | None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    tasks = per_task_gaps(report)
    if tasks:
        plots["gap per task"] = plot_gap(tasks, out / "gap_per_task.png")
    groups = dict(tasks)
    groups.update(
        {split: s["overall"] for split, s in report.get("generalisation", {}).items() if "speech" in s["overall"]}
    )
    if groups:
        plots["text vs speech accuracy"] = plot_text_vs_speech(groups, out / "text_vs_speech.png")
    curves = read_training_curves(workdir) if workdir is not None else {}
    if curves:
        plots["training curves"] = plot_training_curves(curves, out / "training_curves.png")
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md_path = out / "report.md"
    md_path.write_text(markdown(report, {name: p.name for name, p in plots.items()}))
    return {"report.json": json_path, "report.md": md_path, **{name: p for name, p in plots.items()}}
