"""Hugging Face datasets as a speech source: a `save_to_disk` folder, or Parquet shards.

    {"type": "hf", "path": FOLDER | FILE.parquet | GLOB, "split": "train",
     "audio_column": "audio", "text_column": "text"}

The files are read with pyarrow, as `datasets` writes them, never through `datasets`' own
decoding: a whole Audio column is never decoded (nor read) at once. Opening the source reads
the metadata and the text column only (to count the rows without a transcript); a record
carries its row's encoded audio (`"audio_bytes"`, an `Audio` feature's bytes) or the path it
names, and the pipeline decodes it per example (`audio.decode_audio`), so a row whose audio does
not decode is one skipped example (`skipped/undecodable`, the message naming file and row).

Random access for Grain: the global row index is split over the files by their row counts.
- `save_to_disk` folders (`state.json` naming its `.arrow` files; a `DatasetDict` folder with
  `dataset_dict.json` reads its `split` sub-folder) are memory-mapped: a row costs its own bytes.
  A folder in an object store is copied to local disk once (`storage.local_copy`), as
  `datasets.load_from_disk` does.
- Parquet is read one row group at a time (the last `_ROW_GROUPS_KEPT` are kept), so in shuffled
  order a row costs its whole row group once the shards hold more groups than are kept
  (`benchmarks/sources.py` measures it): for random access over large data, write Parquet with
  small row groups (`Dataset.to_parquet(path, batch_size=8)` writes groups of 8 rows), or use
  `save_to_disk`. In an object store only the row groups read are
  fetched. A folder reads the files of its split (`data/train-00000-of-00002.parquet`,
  `train/0.parquet`, as the Hub lays them out), or all its Parquet files when none names a
  split; a glob (`*` wildcards, no recursive `**`) or a file reads exactly those files.
Files are opened lazily in each process (the source pickles as its file list), so every Grain
worker and every host reads only the rows of its own shard.

Column types: audio is an `Audio` struct `{bytes, path}`, or a string (a path), or binary
(the encoded file); text is a string column. A missing column or one of another type is a
`HFSourceError` naming the file and the columns it has (preflight reports it before the run);
a row whose text is null is skipped at open and counted as `no_transcript`, with a warning
naming the file and rows; a row without audio bytes or path is `skipped/missing_file`.
A relative audio path is relative to the folder of the file that names it.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import os
import re
import threading
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speechlm_jax import storage
from speechlm_jax.data.sources import Record

log = logging.getLogger(__name__)

_ROW_GROUPS_KEPT = 4  # Parquet row groups cached per source and process
_NAMED_ROWS = 10  # rows a warning names before it only counts
_PARQUET_LEVELS = ("*.parquet", "*/*.parquet", "*/*/*.parquet")  # the folder levels searched for shards


class HFSourceError(ValueError):
    """A Hugging Face source that cannot be read: no data files, a missing column, a column of
    another type. One line naming the path (and the file) and what is wrong."""


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _arrow_files(folder: Any, split: str) -> list[str]:
    """The `.arrow` files of a `save_to_disk` folder (a Dataset, or the split of a DatasetDict)."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise HFSourceError(f"{folder}: a DatasetDict without a {split!r} split (splits: {', '.join(splits)})")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    return [os.fspath(folder / f["filename"]) for f in state["_data_files"]]


def _names_split(file: str, split: str) -> bool:
    parts = re.split(r"[\\/]", file)
    return split in parts[:-1] or re.match(rf"{re.escape(split)}[-_.]", parts[-1]) is not None


def _parquet_files(path: str, split: str) -> list[str]:
    if _is_glob(path):
        # The folder above the first part with a wildcard, and the pattern below it.
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if _is_glob(part))
        base = storage.path("/".join(parts[:first]) or ".")
        return sorted(os.fspath(p) for p in base.glob("/".join(parts[first:])) if os.fspath(p).endswith(".parquet"))
    target = storage.path(path)
    if not target.is_dir():
        return [path]
    # Three levels deep: `x.parquet`, `data/train-0.parquet`, `default/train/0.parquet` (object
    # stores list one level per request, so there is no recursive `**`).
    files = sorted(os.fspath(p) for pattern in _PARQUET_LEVELS for p in target.glob(pattern))
    named = [f for f in files if _names_split(os.path.relpath(f, os.fspath(target)), split)]
    return named or files


def data_files(path: str, split: str = "train") -> tuple[str, list[str]]:
    """("arrow" | "parquet", the files) of a Hugging Face source; HFSourceError if there are none."""
    text = os.fspath(path)
    if not _is_glob(text):
        folder = storage.path(text)
        if not folder.exists():
            raise HFSourceError(f"{text} does not exist")
        if folder.is_dir() and ((folder / "state.json").exists() or (folder / "dataset_dict.json").exists()):
            return "arrow", _arrow_files(folder, split)
    files = _parquet_files(text, split)
    if not files:
        raise HFSourceError(f"{text}: no save_to_disk folder (state.json) and no Parquet files")
    return "parquet", files


def _schema(kind: str, file: str) -> pa.Schema:
    if kind == "arrow":
        with pa.memory_map(os.fspath(storage.local_copy(file))) as source:
            return pa.ipc.open_stream(source).schema
    with storage.path(file).open("rb") as f:
        return pq.ParquetFile(f).schema_arrow


def _audio_type_ok(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        return bool(names & {"bytes", "path"})
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


def check_columns(file: str, schema: pa.Schema, audio_column: str, text_column: str) -> None:
    """HFSourceError naming `file` when a column is missing or of a type this source cannot read."""
    names = schema.names
    for role, column in (("audio", audio_column), ("text", text_column)):
        if column not in names:
            raise HFSourceError(
                f"{file}: no {role} column {column!r} (columns: {', '.join(names)}); "
                f"set {role}_column in the source spec"
            )
    audio_type, text_type = schema.field(audio_column).type, schema.field(text_column).type
    if not _audio_type_ok(audio_type):
        raise HFSourceError(
            f"{file}: audio column {audio_column!r} is {audio_type}, not an Audio feature, a path or bytes"
        )
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise HFSourceError(f"{file}: text column {text_column!r} is {text_type}, not a string")


def check_source(spec: dict[str, Any]) -> None:
    """Opens an `hf` source spec's files far enough to check its columns (schemas only, no rows)."""
    split = spec.get("split", "train")
    kind, files = data_files(str(spec["path"]), split)
    for file in files:
        check_columns(file, _schema(kind, file), spec.get("audio_column", "audio"), spec.get("text_column", "text"))


def _warn_rows(file: str, rows: np.ndarray, what: str, cause: str) -> None:
    named = ", ".join(str(r) for r in rows[:_NAMED_ROWS]) + (", ..." if len(rows) > _NAMED_ROWS else "")
    log.warning("%s: %d rows %s (rows %s), skipped as %s", file, len(rows), what, named, cause)


class HFSource:
    """A random-access speech source over a Hugging Face dataset's files (see the module docstring).

    Records are `{"id", "audio": path | None, "audio_bytes": bytes | None, "audio_source":
    "FILE row N", "text", "words": None, "speaker", "duration": None}`; `id` is the row's `id`
    column when it has one, else `FILE-STEM-ROW`.
    """

    def __init__(self, path: str, split: str = "train", *, audio_column: str = "audio", text_column: str = "text"):
        self.path, self.split = os.fspath(path), split
        self.audio_column, self.text_column = audio_column, text_column
        self.kind, self.files = data_files(self.path, split)
        self.skipped: Counter = Counter()
        self._opened: dict[int, Any] = {}
        self._row_groups: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        rows, self._group_starts = [], []
        self._columns: list[list[str]] = []
        for k, file in enumerate(self.files):
            schema = _schema(self.kind, file)
            check_columns(file, schema, audio_column, text_column)
            self._columns.append([audio_column, text_column] + [c for c in ("id", "speaker") if c in schema.names])
            text = self._text_column(k)
            missing = np.flatnonzero(np.asarray(pc.is_null(text).to_numpy(zero_copy_only=False)))
            if len(missing):
                _warn_rows(file, missing, f"without a transcript in {text_column!r}", "no_transcript")
                self.skipped["no_transcript"] += len(missing)
            keep = np.setdiff1d(np.arange(len(text)), missing)
            rows.append(np.stack([np.full(len(keep), k), keep], axis=1))
        # (file, row) of every record, in file order.
        self._rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)

    def _text_column(self, k: int) -> pa.ChunkedArray:
        if self.kind == "arrow":
            return self._arrow_table(k).column(self.text_column)
        with storage.path(self.files[k]).open("rb") as f:
            parquet = pq.ParquetFile(f)
            self._group_starts.append(np.cumsum([0] + [g.num_rows for g in _row_groups(parquet)]).tolist())
            return parquet.read(columns=[self.text_column]).column(self.text_column)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"], state["_row_groups"], state["_lock"] = {}, collections.OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def _arrow_table(self, k: int) -> pa.Table:
        table = self._opened.get(k)
        if table is None:
            source = pa.memory_map(os.fspath(storage.local_copy(self.files[k])))
            table = self._opened[k] = pa.ipc.open_stream(source).read_all()
        return table

    def _parquet_row(self, k: int, row: int) -> pa.Table:
        starts = self._group_starts[k]
        group = bisect.bisect_right(starts, row) - 1
        with self._lock:
            table = self._row_groups.get((k, group))
            if table is None:
                parquet = self._opened.get(k)
                if parquet is None:
                    parquet = self._opened[k] = pq.ParquetFile(self._open_file(k))
                table = parquet.read_row_group(group, columns=self._columns[k])
                self._row_groups[(k, group)] = table
                while len(self._row_groups) > _ROW_GROUPS_KEPT:
                    self._row_groups.popitem(last=False)
            else:
                self._row_groups.move_to_end((k, group))
        return table.slice(row - starts[group], 1)

    def _open_file(self, k: int) -> Any:
        file = self.files[k]
        # A local path lets pyarrow read row groups with its own (thread-safe) positional reads.
        return file if not storage.is_remote(file) else storage.path(file).open("rb")

    def __getitem__(self, index: int) -> Record:
        k, row = (int(v) for v in self._rows[index])
        if self.kind == "arrow":
            table = self._arrow_table(k).select(self._columns[k]).slice(row, 1)
        else:
            table = self._parquet_row(k, row)
        values = table.to_pylist()[0]
        file = self.files[k]
        audio = values[self.audio_column]
        data, audio_path = (audio.get("bytes"), audio.get("path")) if isinstance(audio, dict) else (None, None)
        if isinstance(audio, bytes):
            data = audio
        elif isinstance(audio, str):
            audio_path = audio
        if audio_path and not data:
            audio_path = storage.beside(os.fspath(storage.path(file).parent), audio_path)
        stem = os.path.basename(file).split(".")[0]
        return {
            "id": str(values["id"]) if values.get("id") is not None else f"{stem}-{row}",
            "audio": audio_path if not data else None,
            "audio_bytes": data or None,
            "audio_source": f"{file} row {row}",
            "text": values[self.text_column],
            "words": None,
            "speaker": str(values.get("speaker") or ""),
            "duration": None,
        }


def _row_groups(parquet: pq.ParquetFile) -> list[Any]:
    return [parquet.metadata.row_group(i) for i in range(parquet.metadata.num_row_groups)]
