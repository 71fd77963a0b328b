"""`speechlm-synth`: speak a text file or an items JSONL into a 16 kHz corpus on disk.

    speechlm-synth --input texts.txt --out DIR --voices en-us,en-gb --rates 150,175,200 \\
        --pitches 40,50,60 --workers 2 [--layout librispeech] [--synthesizer module:Class]

Input: a `.jsonl` file of `{"id", "text"}` objects (a missing id becomes the line number),
or any other file as one text per non-empty line, with ids `<file stem>-<line number>`.
Voices are every combination of --voices, --rates and --pitches, assigned to items by a
hash of (--seed, id). Rerunning the same command resumes an interrupted run.
"""

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speechlm_jax import cli, storage
from speechlm_jax.data.tts import DEFAULT_VOICE_NAMES, Synthesizer, voice_grid
from speechlm_jax.data.tts_corpus import synthesize_corpus


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """Items `{"id", "text"}` from a JSONL file or a plain text file (one text per line)."""
    path = storage.path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(lines):
            if line.strip():
                record = json.loads(line)
                items.append({"id": str(record.get("id", number)), "text": record["text"]})
        return items
    return [{"id": f"{path.stem}-{number:06d}", "text": line} for number, line in enumerate(lines) if line.strip()]


def load_synthesizer(spec: str) -> Synthesizer:
    """Instantiates `module:Class` with no arguments."""
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise cli.UsageError(f"--synthesizer must be module:Class, got {spec!r}")
    try:
        kind = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise cli.UsageError(f"--synthesizer {spec}: {error}") from error
    return kind()


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


PROG = "speechlm-synth"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="texts.txt (one per line) or items.jsonl")
    parser.add_argument("--out", required=True, help="output folder (manifest.jsonl + audio)")
    parser.add_argument(
        "--voices", default=",".join(DEFAULT_VOICE_NAMES), help="eSpeak voices[+variant], comma-separated"
    )
    parser.add_argument("--rates", type=_ints, default=[150, 175, 200], help="words per minute, comma-separated")
    parser.add_argument("--pitches", type=_ints, default=[40, 50, 60], help="pitch 0-100, comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="synthesis processes")
    parser.add_argument("--layout", choices=("manifest", "librispeech"), default="manifest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the voice assignment")
    parser.add_argument("--synthesizer", default=None, help="module:Class of another TTS engine")
    return parser


def synthesize(args: argparse.Namespace) -> Any:
    """Speaks the input into the corpus folder; prints the first failures and the summary, returns the report."""
    if not storage.path(args.input).is_file():
        raise cli.UsageError(f"--input {args.input}: no such file")
    voices = voice_grid([v for v in args.voices.split(",") if v], args.rates, args.pitches)
    # An --out in an object store: spoken into a local copy (pulled first, so a rerun resumes),
    # then uploaded.
    out = storage.SyncedDir(args.out, pull=True)
    try:
        report = synthesize_corpus(
            read_items(args.input),
            out.local,
            voices=voices,
            workers=args.workers,
            synthesizer=load_synthesizer(args.synthesizer) if args.synthesizer else None,
            layout=args.layout,
            seed=args.seed,
            progress=True,
        )
    finally:
        out.close()
    for item_id, error in report.failed[:5]:
        print(f"failed {item_id}: {error}")
    print(report.summary())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-synth`): 0 when every item is spoken, 1 when some failed, 2 a bad flag."""

    def body() -> None:
        report = synthesize(build_parser().parse_args(argv))
        if report.failed:
            raise cli.CommandFailed(f"{len(report.failed)} items failed")

    return cli.run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
