"""The package's layers import only downward (`tools/import_graph.py`), and the checker catches a violation."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "import_graph.py"


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root), "--check"], capture_output=True, text=True, timeout=120
    )


def test_no_import_runs_upward():
    result = _check(REPO / "speechlm_jax")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 upward" in result.stderr


def test_an_upward_import_is_flagged(tmp_path: Path):
    root = tmp_path / "speechlm_jax"
    for folder in ("models", "train", "demo"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "demo" / "run.py").write_text("from speechlm_jax.train import loop\n")  # downward: fine
    (root / "models" / "net.py").write_text("def f():\n    from speechlm_jax.train.loop import step\n")  # upward
    (root / "train" / "loop.py").write_text("from ..models import net\n")  # relative, downward
    result = _check(root)
    assert result.returncode == 1
    assert result.stdout.split("\n")[0] == "UPWARD speechlm_jax.models.net -> speechlm_jax.train.loop"
    assert "3 imports between layers, 1 upward" in result.stderr


def test_a_folder_outside_every_layer_is_refused(tmp_path: Path):
    root = tmp_path / "speechlm_jax"
    (root / "extras").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "extras" / "x.py").write_text("import speechlm_jax.models\n")
    result = _check(root)
    assert result.returncode != 0 and "'extras'" in result.stdout + result.stderr
