"""Weights & Biases beside TensorBoard and `metrics.jsonl`: one W&B run per workdir, when asked.

`train.wandb.project` set turns it on (empty: off). The run is opened on process 0 only, with the
resolved config attached; every scalar `MetricWriter` writes goes to it as `<split>/<name>` at its
step; `speechlm-eval` on the workdir attaches its report (report.json, report.md, the plots) to the
same run as an `evaluation` artifact and puts the headline numbers in the run's summary.

    train.wandb.project   the W&B project ("" = no W&B)
    train.wandb.entity    team or user ("" = the account's default)
    train.wandb.name      display name ("" = W&B's)
    train.wandb.mode      "offline" | "online" | "disabled" | "" (= $WANDB_MODE, else offline)

Offline is the default because a training host often has no network: the run is written under
`$WANDB_DIR` (default: the local workdir) and uploaded later with `wandb sync`. The run id is kept
in `<workdir>/wandb_run.json`, so a resumed run and the evaluations of the workdir land in the one
W&B run. `read_offline_run` reads an offline run's `.wandb` file back (config, history, summary,
artifacts) without syncing it: the file is a LevelDB-style log of W&B's `Record` protobufs.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from speechlm_jax import storage

RUN_FILE = "wandb_run.json"


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """`train.wandb` when it names a project, else None (also for a config written before it existed)."""
    w = config.get("train", {}).get("wandb")
    return w if w is not None and w.get("project") else None


def _run_id(workdir: str) -> str:
    record = storage.path(workdir) / RUN_FILE
    if record.exists():
        return json.loads(record.read_text())["id"]
    run_id = secrets.token_hex(4)  # W&B ids are lower-case letters and digits
    storage.write_text(record, json.dumps({"id": run_id}) + "\n")
    return run_id


def _fresh_second(root: str, run_id: str) -> None:
    """Waits for the next second when this run id's last offline folder began in this one: wandb
    names offline folders `offline-run-<YYYYmmdd_HHMMSS>-<id>`, so a second run of the id started
    in the same second (an evaluation right after a short training) would write into the first's."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if glob.glob(os.path.join(root, "wandb", f"offline-run-{stamp}-{run_id}")):
        time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class WandbRun:
    """The W&B run of a workdir (process 0); `open` returns None when W&B is off or on other processes."""

    def __init__(self, run: Any):
        self.run = run

    @classmethod
    def open(
        cls, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, job_type: str = "train"
    ) -> WandbRun | None:
        w = settings(config)
        if w is None or jax.process_index() != 0:
            return None
        import wandb

        workdir = os.fspath(workdir)
        mode = w.get("mode") or os.environ.get("WANDB_MODE") or "offline"
        # Read at each open: wandb's own settings are fixed at its first use in the process.
        local = os.environ.get("WANDB_DIR") or (None if storage.is_remote(workdir) else workdir)
        run_id = _run_id(workdir)
        if mode == "offline":
            _fresh_second(local or os.getcwd(), run_id)
        run = wandb.init(
            project=w.project,
            entity=w.get("entity") or None,
            name=w.get("name") or None,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=local,
            job_type=job_type,
            config=config.to_dict(),
        )
        return cls(run)

    def log(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        """Scalars as `<split>/<name>` at `step`."""
        self.run.log({f"{split}/{name}": float(value) for name, value in scalars.items()}, step=step)

    def attach_report(self, files: Mapping[str, str | os.PathLike], headline: Mapping[str, Any]) -> None:
        """An `evaluation` artifact of the report's files; the headline numbers into the summary
        as `speechlm_eval/<name>` (nested numbers flattened with "/")."""
        import wandb

        artifact = wandb.Artifact(f"eval-report-{self.run.id}", type="evaluation")
        for path in files.values():
            artifact.add_file(os.fspath(storage.local_copy(path)))
        self.run.log_artifact(artifact)
        self.run.summary.update(_flat(headline, "speechlm_eval/"))

    def finish(self) -> None:
        self.run.finish()


def attach_evaluation(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    files: Mapping[str, str | os.PathLike],
    headline: Mapping[str, Any],
) -> bool:
    """`speechlm-eval`'s report into the workdir's W&B run, when the run has W&B on; True if attached."""
    run = WandbRun.open(config, workdir, job_type="eval")
    if run is None:
        return False
    try:
        run.attach_report(files, headline)
    finally:
        run.finish()
    return True


# --- Reading an offline run back.

_BLOCK = 32768  # the log's block size; a record's 7-byte header never straddles two blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclasses.dataclass
class OfflineRun:
    """What an offline run recorded: config and summary values, history rows (with `_step`), artifacts;
    `finished` once the run's exit record is written (`wandb.finish`)."""

    run_id: str
    project: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    artifacts: list[dict[str, Any]]
    finished: bool = False


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
    return records


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def read_offline_run(run_dir: str | os.PathLike) -> OfflineRun:
    """Reads `<run_dir>/run-<id>.wandb` (an `offline-run-*` folder under `wandb/`)."""
    from wandb.proto import wandb_internal_pb2

    files = glob.glob(os.path.join(os.fspath(run_dir), "run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one run-*.wandb file, found {len(files)}")
    run = OfflineRun(run_id="", project="", config={}, history=[], summary={}, artifacts=[])
    for raw in _records(Path(files[0]).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the first run record names it; later ones (resumption, updates) may leave fields empty
            run.run_id, run.project = run.run_id or record.run.run_id, run.project or record.run.project
            run.config.update({_key(u): json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "files": [c.path for c in a.manifest.contents]})
        elif kind == "exit":
            run.finished = True
    return run
