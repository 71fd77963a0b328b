"""`speechlm-generate`: the teacher's own answers, the targets of behavior imitation (MTBI, BLSP).

    speechlm-generate --llm /ckpt/llama --source manifest:/data/train/manifest.jsonl \\
        --tasks repeat,count_words,continuation --out /data/targets --num_shards 64

For every utterance of a paired corpus and every task, the text LLM (its base weights,
LoRA off) answers `task prompt + transcript`, formatted exactly as the teacher twin of a
training example (`data.examples.prompt_segments`), decoded in large batches with the
KV-cache decoder (`generate.generate`, through `evaluation.scoring.Scorer`). The pipeline
reads the output for its `imitation` / `continuation` examples (`data.sources.TargetTable`):
JSONL rows `{"id", "task", "prompt", "response"}` where `prompt` is the phrasing template
(with `{content}`), in shard files `targets-00000-of-00064.jsonl`.

Multi-turn conversations (`--conversations`, JSONL of `data.conversations`) get the
teacher's answer to each assistant turn, given the text twin of the conversation before it
with its own earlier answers (`evaluation.conversation_targets`): rows `{"id", "task":
"conversation", "prompt": "messages[i]", "response"}` in the same shard files, for
`data.conversation_responses = "teacher"`. `--source` and `--tasks` may then be left out.

- Sharded over hosts: the utterances (and the conversations) are cut into `num_shards` contiguous shards and host
  `process_index` writes the shards `i` with `i % process_count == process_index`, each
  host decoding on its own devices (the model must fit on one host).
- Resumable: a shard is written to a temporary file and renamed when complete, so a shard
  file that exists is finished and a rerun skips it; an interrupted shard starts over.
- Deterministic under `--seed`: the phrasings of an utterance are drawn from (seed, id,
  task), sampling (temperature > 0) uses a key folded from (seed, shard, batch), and batches
  are formed the same way on every run, so a resumed run writes what an uninterrupted one
  would have.

A progress bar counts examples; the summary (examples, generated tokens, seconds,
tokens/s) is printed as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from speechlm_jax import cli, storage
from speechlm_jax.cli import parse_list, parse_mesh, parse_source
from speechlm_jax.data.conversations import conversation_source
from speechlm_jax.data.mixture import open_speech_source
from speechlm_jax.data.tasks import get_task, import_task_modules
from speechlm_jax.data.tokenizer import load_tokenizer
from speechlm_jax.evaluation.conversation_targets import conversation_rows, count_turns
from speechlm_jax.evaluation.items import Item
from speechlm_jax.evaluation.scoring import Scorer
from speechlm_jax.models import hf_import
from speechlm_jax.sharding import make_mesh

PROG = "speechlm-generate"


def shard_name(index: int, count: int) -> str:
    return f"targets-{index:05d}-of-{count:05d}.jsonl"


def shard_bounds(num_records: int, index: int, count: int) -> tuple[int, int]:
    """Records [start, end) of shard `index` of `count` (contiguous, sizes differ by at most one)."""
    return index * num_records // count, (index + 1) * num_records // count


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards host `process_index` of `process_count` writes: i % process_count == process_index."""
    return [i for i in range(num_shards) if i % process_count == process_index]


def choose_prompts(pool: Sequence[str], k: int, seed: int, utterance_id: str, task: str) -> list[str]:
    """`k` distinct phrasings (all when k >= the pool or k <= 0), drawn from (seed, id, task) alone."""
    if k <= 0 or k >= len(pool):
        return list(pool)
    digest = hashlib.blake2b(f"{seed}|{utterance_id}|{task}".encode(), digest_size=8).digest()
    order = np.random.default_rng(int.from_bytes(digest, "big")).permutation(len(pool))
    return [pool[i] for i in sorted(order[:k])]


def shard_requests(
    records: Sequence[dict[str, Any]], tasks: Sequence[str], *, prompt_split: str, prompts_per_example: int, seed: int
) -> list[Item]:
    """The questions of one shard, in record order: one per (record, task, phrasing)."""
    requests = []
    for record in records:
        text = " ".join(str(record.get("text", "")).split())
        if not text:
            continue
        for name in tasks:
            pool = get_task(name).prompts(prompt_split)
            for prompt in choose_prompts(pool, prompts_per_example, seed, str(record["id"]), name):
                requests.append(Item(id=str(record["id"]), task=name, question=text, answer="", prompt=prompt))
    return requests


def write_shard(path: storage.PathLike, rows: Sequence[dict[str, str]]) -> None:
    """Publishes the shard whole: a complete file or none, locally or in an object store."""
    storage.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """What `speechlm-generate` is asked: one field per flag (see `build_parser`), with its defaults."""

    llm: str
    out: str
    source: dict[str, str] | None = None
    tasks: Sequence[str] = ()
    conversations: Sequence[str] = ()
    tokenizer: str = ""
    split: str = "train"
    task_modules: Sequence[str] = ()
    prompt_split: str = "train"
    prompts_per_example: int = 1
    num_shards: int = 8
    batch_size: int = 64
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
    dtype: str = "bfloat16"
    limit: int = 0
    no_progress: bool = False
    distributed: bool = False

    def __post_init__(self) -> None:
        # The command line's string forms are accepted from Python too.
        for name in ("tasks", "task_modules", "conversations"):
            value = getattr(self, name)
            object.__setattr__(self, name, parse_list(value) if isinstance(value, str) else tuple(value))
        if isinstance(self.source, str) and self.source:
            object.__setattr__(self, "source", parse_source(self.source))
        if isinstance(self.mesh, str):
            object.__setattr__(self, "mesh", parse_mesh(self.mesh))


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", required=True, help="HF checkpoint folder of the text LLM (the teacher)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: --llm)")
    p.add_argument(
        "--source", type=parse_source, default=None, help="paired corpus, TYPE:PATH (manifest|librispeech|tfds)"
    )
    p.add_argument(
        "--conversations",
        type=parse_list,
        default=(),
        help="comma-separated multi-turn conversation JSONL files: the teacher answers every assistant turn",
    )
    p.add_argument("--split", default="train", help="TFDS split")
    p.add_argument("--tasks", type=parse_list, default=(), help="comma-separated registered task names (for --source)")
    p.add_argument(
        "--task_modules", type=parse_list, default=(), help="comma-separated modules to import that register tasks"
    )
    p.add_argument("--prompt_split", default="train", choices=("train", "heldout"))
    p.add_argument("--prompts_per_example", type=int, default=1, help="phrasings per (utterance, task); 0 = all")
    p.add_argument("--out", required=True, help="output folder for the shard files")
    p.add_argument("--num_shards", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", type=parse_mesh, default={"data": -1}, help="axis sizes over this host's devices")
    p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype")
    p.add_argument("--limit", type=int, default=0, help="use only the first N utterances (0 = all)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    return p


def parse_request(argv: Sequence[str] | None = None) -> GenerateRequest:
    """The command line of `speechlm-generate` as a GenerateRequest (argparse exits on a bad flag)."""
    return GenerateRequest(**vars(build_parser().parse_args(argv)))


def generate_targets(**options: Any) -> dict[str, Any]:
    """`speechlm-generate` from Python: the keyword arguments are GenerateRequest's fields; returns the summary."""
    return run(GenerateRequest(**options))


def run(args: GenerateRequest) -> dict[str, Any]:
    """Generates this host's unfinished shards; returns the summary."""
    if args.distributed:
        jax.distributed.initialize()
    import_task_modules(args.task_modules)
    tasks = list(args.tasks)
    if args.source is None and not args.conversations:
        raise cli.UsageError("give --source (with --tasks) or --conversations")
    if args.source is not None and not tasks:
        raise cli.UsageError("--tasks names no task")
    if tasks and args.source is None:
        raise cli.UsageError("--tasks asks about a paired corpus: give it with --source")
    for name in tasks:
        try:
            get_task(name)
        except KeyError as error:
            raise cli.UsageError(error.args[0]) from None
    out = storage.path(args.out)
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    records = open_speech_source(args.source, args.split) if args.source is not None else []
    count = min(len(records), args.limit) if args.limit else len(records)
    conversations = [r for path in args.conversations for r in conversation_source(path).records]
    conversation_count = min(len(conversations), args.limit) if args.limit else len(conversations)
    mine = host_shards(args.num_shards, jax.process_index(), jax.process_count())
    todo = [i for i in mine if not (out / shard_name(i, args.num_shards)).exists()]
    summary: dict[str, Any] = {
        "shards": len(mine),
        "shards_skipped": len(mine) - len(todo),
        "examples": 0,
        "generated_tokens": 0,
        "seconds": 0.0,
        "tokens_per_second": 0.0,
    }
    if todo:
        if not storage.path(args.llm).is_dir():
            raise cli.UsageError(f"--llm {args.llm}: no such folder")
        tokenizer = load_tokenizer(args.tokenizer or args.llm)
        mesh = make_mesh(args.mesh, jax.local_devices())
        dtype = jnp.dtype(args.dtype)
        llm = hf_import.load_llm(args.llm, dtype=dtype, param_dtype=dtype, mesh=mesh)
        scorer = Scorer(llm, tokenizer, mesh=mesh, batch_size=args.batch_size)
        shards = {
            i: shard_requests(
                [records[k] for k in range(*shard_bounds(count, i, args.num_shards))],
                tasks,
                prompt_split=args.prompt_split,
                prompts_per_example=args.prompts_per_example,
                seed=args.seed,
            )
            for i in todo
        }
        dialogues = {
            i: [conversations[k] for k in range(*shard_bounds(conversation_count, i, args.num_shards))] for i in todo
        }
        bar = tqdm(
            total=sum(len(r) for r in shards.values()) + sum(count_turns(d) for d in dialogues.values()),
            unit="ex",
            desc="speechlm-generate",
            disable=args.no_progress,
            file=sys.stderr,
        )
        key = jax.random.key(args.seed)
        start = time.perf_counter()
        for i, requests in shards.items():
            prepared = [scorer.prepare(scorer.segments(r, spoken=False, response=None)) for r in requests]
            responses, tokens = (
                scorer.generate_prepared(
                    prepared,
                    "text",
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    rng=jax.random.fold_in(key, i),
                    progress=bar.update,
                )
                if prepared
                else ([], 0)
            )
            turns, turn_tokens = conversation_rows(
                scorer,
                dialogues[i],
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                # Keys apart from the speech requests' (folded with shard numbers below num_shards).
                rng=jax.random.fold_in(key, args.num_shards + i),
                progress=bar.update,
            )
            write_shard(
                out / shard_name(i, args.num_shards),
                [
                    {"id": r.id, "task": r.task, "prompt": r.prompt, "response": text}
                    for r, text in zip(requests, responses)
                ]
                + turns,
            )
            summary["examples"] += len(requests) + len(turns)
            summary["generated_tokens"] += tokens + turn_tokens
        bar.close()
        summary["seconds"] = time.perf_counter() - start
        summary["tokens_per_second"] = summary["generated_tokens"] / max(summary["seconds"], 1e-9)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-generate`); prints the summary as one JSON line, returns the exit status."""

    def body() -> None:
        summary = run(parse_request(argv))
        print(json.dumps({"speechlm_generate": summary}), flush=True)

    return cli.run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
