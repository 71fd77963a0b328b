"""`tools/fault_injection.py` as a user runs it: kill -9 inside the data iterator's save and between
the written items and orbax's commit, restart, and reach the uninterrupted run's final state.

The full set of kill points (array writes, old-step deletion, random moments) runs from the
command line: `python tools/fault_injection.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kill_points_resume_to_the_uninterrupted_state(tiny_corpus, tmp_path):
    command = [
        sys.executable,
        str(REPO / "tools" / "fault_injection.py"),
        "--points=data,between",
        "--random=0",
        f"--corpus={tiny_corpus}",
        f"--work={tmp_path}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    kills, summary = lines[:-1], lines[-1]
    assert summary["kill_points"] == summary["passed"] == 2
    assert [k["kill_point"] for k in kills] == ["data", "between"]
    # Killed inside the second save (step 4): the restart continues from step 2's checkpoint.
    assert all(k["resumed_from"] == 2 and k["complete_checkpoints"] == [2] for k in kills), kills
