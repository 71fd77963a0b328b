"""VoiceBench subsets from local copies: each item as speech, as text, and through the cascade.

VoiceBench (the `hlt-lab/voicebench` dataset on the Hugging Face hub) speaks each question of
a text benchmark (Google TTS, or people for BBH and SD-QA). A row holds the recording in an
`audio` column (the `datasets` Audio feature: encoded bytes and a file name), the question as
the assistant would read it in `prompt`, and what scores the response:

    openbookqa, mmsu   `reference`: the right option letter, "A".."D" (mmsu: one split per
                       domain, law ... physics)
    bbh                `id` (names the task: navigate, web_of_lies, ...), `reference`: yes/no
                       or (A)/(B)
    ifeval             `key`, `instruction_id_list` and `kwargs` (one dict per instruction)

The local copy is what a user downloads from the hub: the subset's folder of Parquet shards
(`openbookqa/test-00000-of-00001.parquet`; mmsu's shards named by domain), one Parquet file, or a
folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict of splits). The split
a shard or DatasetDict entry holds is the item's task (mmsu's domains are reported one by one).

Each item is answered greedily three ways, VoiceBench's two modalities plus the cascade:

    speech    the recording alone to the speech LLM (LoRA on), no text instruction
    text      `prompt` to the base LLM (LoRA off): the text upper bound
    cascade   the connector's CTC transcript of the recording to the base LLM (`cascade.py`)

and scored by the subset's rule (`voicebench_rules`); gap = text - speech, and cascade_gap =
cascade - speech (above 0: the cascade beats the speech LLM). Rows are checked and
their audio decoded when the subset is read, before any model loads (`VoiceBenchError` names the
file, row and column).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from speechlm_jax import storage
from speechlm_jax.data.audio import AudioError, decode_audio, load_audio
from speechlm_jax.evaluation import cascade, voicebench_rules
from speechlm_jax.evaluation.items import Item
from speechlm_jax.evaluation.scoring import SAMPLE_RATE, Scorer, Speech

SUBSETS = ("openbookqa", "mmsu", "bbh", "ifeval")
# Subsets that need an API judge or an uninstallable scorer, and why they are not read.
UNSCORED = {
    # VoiceBench's `qa` evaluator reports two numbers for SD-QA: gpt-4o-mini's yes/no verdict
    # (majority of three) and PEDANT from qa-metrics 0.2.17 (`PEDANT().evaluate([reference],
    # response, prompt)`, all lower-cased, the mean in percent). Neither can run beside JAX here.
    "sd-qa": "VoiceBench scores it with a gpt-4o-mini judge and with PEDANT from qa-metrics 0.2.17. "
    "Every qa-metrics release requires scikit-learn==1.3.2, which requires numpy<2 (JAX needs "
    "numpy>=2), and PEDANT's classifier, which qa-metrics fetches from github.com/zli12321/qa_metrics "
    "into its own package folder when it starts, is a scikit-learn 1.3.2 pickle that scikit-learn 1.9 "
    "cannot load. Score SD-QA in a separate environment with "
    "qa-metrics==0.2.17 and scikit-learn==1.3.2, with VoiceBench's own scripts (api_judge.py, then "
    "evaluate.py --evaluator qa; see the README)",
    "alpacaeval": "it is scored by a GPT judge",
    "alpacaeval_full": "it is scored by a GPT judge",
    "alpacaeval_speaker": "it is scored by a GPT judge",
    "commoneval": "it is scored by a GPT judge",
    "wildvoice": "it is scored by a GPT judge",
    "advbench": "it is scored by a refusal judge",
    "mtbench": "it is multi-turn and scored by a GPT judge",
}
_COLUMNS = {
    "openbookqa": ("audio", "prompt", "reference"),
    "mmsu": ("audio", "prompt", "reference"),
    "bbh": ("audio", "prompt", "reference", "id"),
    "ifeval": ("audio", "prompt", "key", "instruction_id_list", "kwargs"),
}
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


class VoiceBenchError(ValueError):
    """A VoiceBench copy that cannot be scored; the message names the file (and row, column)."""


@dataclasses.dataclass(frozen=True)
class VoiceBenchItem:
    """One row: the `Item` the Scorer asks (question = `prompt`, audio = a key into the recordings)
    and what its subset's rule scores against."""

    subset: str
    item: Item
    reference: str = ""
    instruction_ids: tuple[str, ...] = ()
    kwargs: tuple[Mapping[str, Any], ...] = ()


@dataclasses.dataclass
class Subset:
    """A read subset: its items and their decoded recordings (int16 at 16 kHz, by audio key)."""

    name: str
    path: str
    items: list[VoiceBenchItem]
    waveforms: dict[str, np.ndarray]


def parse_spec(spec: str) -> tuple[str, str]:
    """ "SUBSET=PATH" or "PATH" (the folder's name is the subset) -> (subset, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, spec.rstrip("/").rsplit("/", 1)[-1]
    name = name.strip().lower()
    if name in UNSCORED:
        raise VoiceBenchError(f"VoiceBench subset {name!r} ({path}) is not supported: {UNSCORED[name]}")
    if name not in SUBSETS:
        raise VoiceBenchError(
            f"{spec!r}: name the subset as SUBSET=PATH (or use a folder named by it); scored subsets: {SUBSETS}"
        )
    return name, path


def _split_of(file: str) -> str:
    """The split a Parquet shard holds, from the hub's naming: `law-00000-of-00001.parquet` -> law."""
    stem = os.path.basename(file).removesuffix(".parquet")
    match = _SHARD.match(stem)
    return match.group("split") if match else stem


def _parquet_shards(folder: str) -> dict[str, list[str]]:
    shards: dict[str, list[str]] = defaultdict(list)
    for file in sorted(pathlib.Path(folder).glob("*.parquet")):
        shards[_split_of(os.fspath(file))].append(os.fspath(file))
    return dict(shards)


def _read_parquet(files: Sequence[str]) -> Any:
    """The shards of one split as one in-memory `datasets.Dataset` (its features from the files'
    own metadata), without the copy into the datasets cache that `Dataset.from_parquet` makes."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    return datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in files]))


def _splits(path: str) -> list[tuple[str, Any, str]]:
    """(split, `datasets.Dataset` with undecoded audio, source name) of each split a copy holds."""
    import datasets

    root = storage.path(path)
    if not root.exists():
        raise VoiceBenchError(f"{path}: no such file or folder")
    local = storage.local_copy(path)
    found: list[tuple[str, Any, str]] = []
    if root.is_dir() and ((root / "state.json").exists() or (root / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(os.fspath(local))
        parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("test", loaded)]
        found = [(split, ds, f"{path}[{split}]") for split, ds in parts]
    else:
        shards = (
            _parquet_shards(os.fspath(local)) if root.is_dir() else {_split_of(os.fspath(local)): [os.fspath(local)]}
        )
        if not shards:
            raise VoiceBenchError(f"{path}: neither a save_to_disk folder nor a folder of Parquet shards")
        found = [(split, _read_parquet(files), path) for split, files in sorted(shards.items())]
    out = []
    for split, ds, source in found:
        if "audio" in ds.column_names:
            ds = ds.cast_column("audio", datasets.Audio(decode=False))
        out.append((split, ds, source))
    return out


def _decode(audio: Any, base: str, where: str) -> np.ndarray:
    if not isinstance(audio, Mapping) or not (audio.get("bytes") or audio.get("path")):
        raise VoiceBenchError(f"{where}: column 'audio' holds no recording")
    try:
        if audio.get("bytes"):
            return decode_audio(audio["bytes"], sample_rate=SAMPLE_RATE, source=where)
        file = audio["path"] if os.path.isabs(audio["path"]) else os.path.join(base, audio["path"])
        return load_audio(file, sample_rate=SAMPLE_RATE)
    except AudioError as e:
        raise VoiceBenchError(f"{where}: column 'audio' cannot be used: {e.reason}") from None


def _text(row: Mapping[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise VoiceBenchError(f"{where}: column {column!r} is empty")
    return str(value)


def read_subset(spec: str, *, limit: int = 0) -> Subset:
    """Every row of a local VoiceBench subset ("SUBSET=PATH" or "PATH"), checked and its audio
    decoded; the first `limit` rows of each split when `limit` > 0."""
    name, path = parse_spec(spec)
    base = os.fspath(storage.local_copy(path))
    base = base if os.path.isdir(base) else os.path.dirname(base)
    items: list[VoiceBenchItem] = []
    waveforms: dict[str, np.ndarray] = {}
    for split, ds, source in _splits(path):
        missing = [c for c in _COLUMNS[name] if c not in ds.column_names]
        if missing:
            raise VoiceBenchError(
                f"{source}: subset {name!r} needs the columns {list(_COLUMNS[name])}; missing {missing}"
            )
        rows = range(len(ds)) if limit <= 0 else range(min(limit, len(ds)))
        task = name if split == "test" else f"{name}/{split}"
        for i in rows:
            row = ds[i]
            where = f"{source} row {i}"
            prompt = _text(row, "prompt", where)
            key = str(next((row[c] for c in ("id", "key", "question_id") if row.get(c) is not None), i))
            item_id = f"{task}/{key}"
            if item_id in waveforms:
                raise VoiceBenchError(f"{where}: id {key!r} appears twice in split {split!r}")
            waveforms[item_id] = _decode(row["audio"], base, where)
            extra: dict[str, Any] = {}
            if name in ("openbookqa", "mmsu"):
                reference = _text(row, "reference", where).strip().upper()
                if reference not in voicebench_rules.LETTERS:
                    raise VoiceBenchError(f"{where}: 'reference' must be one of A-D, got {row['reference']!r}")
                extra["reference"] = reference
            elif name == "bbh":
                reference = _text(row, "reference", where)
                if reference.strip().lower() not in voicebench_rules.BBH_REFERENCES:
                    raise VoiceBenchError(f"{where}: 'reference' must be yes, no, (A) or (B), got {reference!r}")
                try:
                    voicebench_rules.bbh_task(key)
                except ValueError as e:
                    raise VoiceBenchError(f"{where}: {e}") from None
                extra["reference"] = reference
            else:
                ids, kwargs = row["instruction_id_list"], row["kwargs"]
                if not ids or not isinstance(ids, list) or not isinstance(kwargs, list) or len(kwargs) != len(ids):
                    raise VoiceBenchError(f"{where}: 'instruction_id_list' and 'kwargs' must be lists of one length")
                extra["instruction_ids"] = tuple(str(i) for i in ids)
                extra["kwargs"] = tuple(_checker_args(kw) for kw in kwargs)
            item = Item(id=item_id, task=task, question=prompt, answer=extra.get("reference", ""), audio=item_id)
            items.append(VoiceBenchItem(subset=name, item=item, **extra))
    if not items:
        raise VoiceBenchError(f"{path}: no rows")
    if name == "ifeval":
        _check_ifeval(items, path)
    return Subset(name=name, path=path, items=items, waveforms=waveforms)


def _checker_args(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """One instruction's arguments: the struct column's unused (None) fields dropped, and counts
    that a Parquet writer stored as floats (5.0) made ints again, as the checkers compare them."""
    out = {}
    for key, value in (kwargs or {}).items():
        if value is not None:
            out[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    return out


def _check_ifeval(items: Sequence[VoiceBenchItem], path: str) -> None:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    ids = sorted({i for it in items for i in it.instruction_ids})
    unknown = [i for i in ids if i not in INSTRUCTION_DICT]
    if unknown:
        raise VoiceBenchError(f"{path}: IFEval instructions unknown to if-verifiable: {unknown}")
    missing = voicebench_rules.missing_nltk_data(ids)
    if missing:
        raise VoiceBenchError(
            f"{path}: the IFEval checkers of this subset need NLTK data that is not installed: "
            f"run `python -m nltk.downloader {' '.join(missing)}`"
        )


class RecordedSpeech:
    """The recordings of read subsets by audio key; any other item's speech comes from `fallback`."""

    def __init__(self, waveforms: Mapping[str, np.ndarray], fallback: Speech):
        self.waveforms = dict(waveforms)
        self.fallback = fallback

    def waveform(self, text: str, audio: str | None) -> np.ndarray:
        if audio is not None and audio in self.waveforms:
            return self.waveforms[audio]
        return self.fallback.waveform(text, audio)


def score_response(vb: VoiceBenchItem, response: str, *, seed: int = 0) -> dict[str, Any]:
    """The subset's rule applied to one response (see `voicebench_rules`); always has "correct"."""
    key = vb.item.id.rsplit("/", 1)[-1]
    if vb.subset in ("openbookqa", "mmsu"):
        return voicebench_rules.score_choice(response, vb.reference, key=vb.item.id, seed=seed)
    if vb.subset == "bbh":
        return voicebench_rules.score_bbh(response, vb.reference, key=key, seed=seed)
    return voicebench_rules.score_ifeval(
        response, prompt=vb.item.question, instruction_ids=vb.instruction_ids, kwargs=vb.kwargs
    )


def summarise_condition(subset: str, scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One condition's numbers over items: "score" (the subset's headline: accuracy, or IFEval's
    mean of four) and the rule's details (the guessed share `fail`, IFEval's four accuracies)."""
    if subset == "ifeval":
        return voicebench_rules.ifeval_summary(scores)
    return {
        "score": float(np.mean([s["correct"] for s in scores])),
        "fail": float(np.mean([s["guessed"] for s in scores])),
    }


def run_voicebench(
    scorer: Scorer,
    subset: Subset,
    *,
    max_new_tokens: int,
    blank_id: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Text (base LLM), speech (speech LLM) and, with `blank_id`, cascade answers to every item,
    scored by the subset's rule: overall and per task, each condition's numbers, gap = text - speech,
    cascade_gap = cascade - speech.

    A scorer holding a base LLM alone answers the text condition only.
    """
    conditions = ["text"]
    if scorer.has_speech:
        conditions.append("speech")
        if blank_id is not None:
            conditions.append("cascade")
    asked = [vb.item for vb in subset.items]
    records: list[dict[str, Any]] = [
        {"id": it.id, "task": it.task, "reference": vb.reference} for vb, it in zip(subset.items, asked)
    ]
    for condition in conditions:
        questions = asked
        if condition == "cascade":
            spoken = [scorer.speech.waveform(it.question, it.audio) for it in asked]
            transcripts = cascade.transcribe(scorer, spoken, blank_id=blank_id)
            questions = [dataclasses.replace(it, question=t) for it, t in zip(asked, transcripts)]
            for record, transcript in zip(records, transcripts):
                record["transcript"] = transcript
        responses = scorer.generate_items(
            questions, "text" if condition == "cascade" else condition, max_new_tokens=max_new_tokens
        )
        for record, vb, response in zip(records, subset.items, responses):
            record[condition] = response
            record[f"{condition}_score"] = score_response(vb, response, seed=seed)
    by_task: dict[str, list[int]] = defaultdict(list)
    for k, record in enumerate(records):
        by_task[record["task"]].append(k)

    def numbers(indices: Sequence[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"items": len(indices)}
        for condition in conditions:
            details = summarise_condition(subset.name, [records[k][f"{condition}_score"] for k in indices])
            out[condition] = details["score"]
            out[f"{condition}_details"] = details
        if "speech" in out:
            out["gap"] = out["text"] - out["speech"]
        if "cascade" in out:
            out["cascade_gap"] = out["cascade"] - out["speech"]
        return out

    return {
        "path": subset.path,
        "conditions": conditions,
        "overall": numbers(range(len(records))),
        "tasks": {task: numbers(ks) for task, ks in sorted(by_task.items())} if len(by_task) > 1 else {},
        "items": records,
    }
