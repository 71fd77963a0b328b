"""Resumable stages: a folder whose done-marker records the settings it was built with.

The demo's stages and `speechlm-select`'s share this one cache. A stage is finished when
`<folder>/done.json` exists; it holds the stage's settings (what decides whether the stage
can be reused) and its results (counts, seconds: recorded and read back, never compared).
The marker is written after everything else, so an interrupted stage never counts as done.

When a finished stage's settings differ from the ones asked for, a stage either
- `rebuild`s: the folder is cleared and built again (the demo, whose stages are pure
  functions of their inputs and whose settings are a hash of them), or
- `refuse`s: `StageChanged` names the settings that differ (`speechlm-select`, whose stages
  may hold hours of synthesis or training; the user clears a stage explicitly with --force).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from speechlm_jax import storage

MARKER = "done.json"
OnChange = Literal["rebuild", "refuse"]


class StageChanged(RuntimeError):
    """A finished stage was built with other settings and may not be rebuilt silently."""


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def record(folder: storage.PathLike) -> dict[str, Any] | None:
    """The done-marker of a finished stage (settings and results), or None if unfinished."""
    marker = storage.path(folder) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def finished(folder: storage.PathLike, settings: dict[str, Any], *, on_change: OnChange) -> bool:
    """Whether the stage in `folder` is finished with these settings (see the module docstring)."""
    folder = storage.path(folder)
    previous = record(folder)
    if previous is None:
        return False
    wanted = _plain(settings)
    changed = sorted(k for k in wanted if previous.get(k) != wanted[k])
    if not changed:
        return True
    if on_change == "refuse":
        raise StageChanged(f"{folder.name} finished with other settings ({', '.join(changed)}); rerun with --force")
    folder.rmtree()
    return False


def finish(folder: storage.PathLike, settings: dict[str, Any], **results: Any) -> None:
    """Marks the stage in `folder` finished with `settings`, recording `results` beside them.

    The marker is published whole (`storage.write_text`), last: a stage killed before it is unfinished."""
    storage.write_text(
        storage.path(folder) / MARKER,
        json.dumps({**_plain(settings), **_plain(results)}, indent=2, sort_keys=True) + "\n",
    )
