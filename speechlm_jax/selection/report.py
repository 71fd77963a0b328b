"""The active-selection report: one row per text cluster, a plot, merged into the evaluation report.

    cluster | size | share of corpus (P_web) | M before | P(c) | share sampled | M after

`M before` is the stage-1 model's misalignment on the cluster's probe texts, `M after`
the stage-2 model's on the same texts (kept out of the sampled data); `share sampled` is
the cluster's fraction of the selected texts. `selection_clusters.png` shows M before and
after per cluster (clusters ordered by M before) above the corpus share and the sampled
share, which is where the M^gamma tilt is visible.

`merge_into_report` adds the summary to an evaluation report folder (`speechlm-eval
--out`): the "selection" key of report.json and a section of report.md (replaced, not
duplicated, when merged again), with the plot copied next to them.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speechlm_jax import storage

SECTION = "## Active selection (SALAD stage 2)"


def cluster_rows(
    sizes: Sequence[int],
    m_before: Sequence[float],
    probabilities: Sequence[float],
    sampled: Sequence[int],
    m_after: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The table's rows, one dict per cluster (see the module docstring)."""
    sizes_np = np.asarray(sizes, np.float64)
    total_sampled = max(int(np.sum(sampled)), 1)
    rows = []
    for c in range(len(sizes)):
        row = {
            "cluster": c,
            "size": int(sizes[c]),
            "share_corpus": float(sizes_np[c] / sizes_np.sum()),
            "m_before": float(m_before[c]),
            "p_target": float(probabilities[c]),
            "share_sampled": float(sampled[c] / total_sampled),
        }
        if m_after is not None:
            row["m_after"] = float(m_after[c])
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown(summary: Mapping[str, Any], plot: str | None = None) -> str:
    """The report section: settings, overall M before/after, and the cluster table."""
    rows = summary["clusters"]
    columns = ["size", "share_corpus", "m_before", "p_target", "share_sampled"] + (
        ["m_after"] if "m_after" in rows[0] else []
    )
    lines = [
        SECTION,
        "",
        f"{len(rows)} clusters; gamma = {summary['gamma']}; {summary['selected_texts']} texts selected, "
        f"{summary['selected_seconds'] / 3600:.3f} h of speech (budget {summary['budget_seconds'] / 3600:.3f} h).",
        "",
    ]
    for key in ("m_before", "m_after"):
        if key in summary.get("overall", {}):
            lines.append(f"- overall {key.replace('_', ' ')} (per token, probe texts): {_fmt(summary['overall'][key])}")
    lines += ["", "| cluster | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in sorted(rows, key=lambda r: -r["m_before"] if not math.isnan(r["m_before"]) else math.inf):
        lines.append(f"| {row['cluster']} | " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    if plot:
        lines += ["", f"![clusters]({plot})"]
    return "\n".join(lines) + "\n"


def plot_clusters(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """M before/after (top) and corpus vs sampled share (bottom) per cluster, ordered by M before."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(rows)), key=lambda i: -np.nan_to_num(rows[i]["m_before"], nan=-np.inf))
    x = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.12 * len(rows) + 4), 6), sharex=True)
    top.bar(x - 0.2, [rows[i]["m_before"] for i in order], width=0.4, label="M before")
    if "m_after" in rows[0]:
        top.bar(x + 0.2, [rows[i]["m_after"] for i in order], width=0.4, label="M after")
    top.set_ylabel("misalignment M (per token)")
    top.legend()
    bottom.bar(x - 0.2, [rows[i]["share_corpus"] for i in order], width=0.4, label="share of corpus")
    bottom.bar(x + 0.2, [rows[i]["share_sampled"] for i in order], width=0.4, label="share sampled")
    bottom.set_ylabel("share")
    bottom.set_xlabel("cluster (ordered by M before)")
    bottom.set_xticks(x, [str(rows[i]["cluster"]) for i in order], fontsize=6, rotation=90)
    bottom.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_selection_report(summary: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """selection.json, selection.md and selection_clusters.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_clusters(summary["clusters"], out / "selection_clusters.png")
    json_path = out / "selection.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path = out / "selection.md"
    md_path.write_text(markdown(summary, plot.name))
    return {"selection.json": json_path, "selection.md": md_path, "plot": plot}


def merge_into_report(summary: Mapping[str, Any], report_dir: str | Path, plot: str | Path) -> None:
    """Adds the selection summary to an evaluation report folder (report.json, report.md), local or
    in an object store."""
    folder = storage.SyncedDir(report_dir, pull=True)
    try:
        _merge(summary, folder.local, Path(plot))
    finally:
        folder.close()


def _merge(summary: Mapping[str, Any], report_dir: Path, plot: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    if plot.parent.resolve() != report_dir.resolve():
        shutil.copyfile(plot, report_dir / plot.name)
    json_path = report_dir / "report.json"
    report = json.loads(json_path.read_text()) if json_path.is_file() else {}
    report["selection"] = summary
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md_path = report_dir / "report.md"
    text = md_path.read_text() if md_path.is_file() else "# speechlm-eval report\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        following = rest.find("\n## ")
        text = head + (rest[following + 1 :] if following >= 0 else "")
    md_path.write_text(text.rstrip("\n") + "\n\n" + markdown(summary, plot.name))
