"""The selection report: the cluster table, the plot, and the merge into an evaluation report."""

from __future__ import annotations

import json

from speechlm_jax.evaluation.report import write_report
from speechlm_jax.selection import report


def _summary(with_after: bool = True) -> dict:
    rows = report.cluster_rows(
        [10, 30, 60], [0.3, 0.1, 0.2], [0.5, 0.1, 0.4], [5, 1, 4], [0.2, 0.1, 0.15] if with_after else None
    )
    return {
        "gamma": 5.0,
        "budget_seconds": 3600.0,
        "selected_seconds": 3500.0,
        "selected_texts": 10,
        "clusters": rows,
        "overall": {"m_before": 0.2, "m_after": 0.15},
    }


def test_rows_and_markdown_table():
    summary = _summary()
    rows = summary["clusters"]
    assert [r["share_corpus"] for r in rows] == [0.1, 0.3, 0.6]
    assert [r["share_sampled"] for r in rows] == [0.5, 0.1, 0.4]
    text = report.markdown(summary, "p.png")
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in table] == ["0", "2", "1"]  # ordered by M before
    assert "m_after" in text and "![clusters](p.png)" in text


def test_merge_into_an_evaluation_report_once(tmp_path):
    eval_dir = tmp_path / "eval"
    write_report(
        {
            "model": {"workdir": "run"},
            "diagnostics": {
                "misalignment": {"per_token": 0.2, "per_sequence": 1.0, "tokens": 10},
                "forgetting": {"per_token": 0.0, "per_sequence": 0.0, "tokens": 10},
                "sequences": 2,
                "prefix_fraction": 0.5,
            },
        },
        eval_dir,
    )
    paths = report.write_selection_report(_summary(), tmp_path / "sel")
    assert paths["plot"].stat().st_size > 0
    report.merge_into_report(_summary(), eval_dir, paths["plot"])
    report.merge_into_report(_summary(), eval_dir, paths["plot"])
    text = (eval_dir / "report.md").read_text()
    assert text.count(report.SECTION) == 1 and "## SALAD diagnostics" in text
    assert (eval_dir / paths["plot"].name).is_file()
    merged = json.loads((eval_dir / "report.json").read_text())
    assert merged["selection"]["gamma"] == 5.0 and merged["diagnostics"]["sequences"] == 2
