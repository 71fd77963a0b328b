"""Kill -9 at the moments a checkpoint is most fragile, restart, and check the run ends where an
uninterrupted one does.

    python tools/fault_injection.py [--points arrays,data,between,cleanup] [--random 4] [--steps 8]

Each kill point is a seam of orbax's asynchronous save (the version installed), hit at the
`--save`-th checkpoint of an `asr:tiny` run with `checkpoint.every=2` and `keep=2`:

    arrays    the trainable and optimiser arrays are being written (their async save has
              started, its commit futures are still running)
    data      the Grain iterator's state file is half written
    between   every item is written, the step is not yet committed (orbax's commit callback)
    cleanup   the step is committed and orbax is deleting the steps beyond `keep` (the first
              deletion at or after the `--save`-th save)
    random    at a random moment after a random step (`--random N` of them)

The process SIGKILLs itself at the seam (a patch installed in the child, never in the
trainer). Then `speechlm-train` restarts with the same command, and the script checks that it
resumed from the last complete checkpoint, that every step after it logs the loss and data
counters of the uninterrupted run, and that the final trainable parameters, optimiser state and
data-iterator state are bitwise those of the uninterrupted run. One JSON line per kill, then a
summary line; exit status 0 when every kill point holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
POINTS = ("arrays", "data", "between", "cleanup")


# --- the child: a trainer that kills itself at one seam


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, nth: int) -> None:
    """Patches the seam of `point` to SIGKILL this process on its `nth` call (1-based)."""
    import grain
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler
    from orbax.checkpoint._src.path import atomicity, deleter

    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    if point == "arrays":
        # Two StandardSave items per step (trainable, opt_state): kill once the first of the
        # nth save has started writing (its commit futures run), before the second has.
        original = standard_checkpoint_handler.StandardCheckpointHandler.async_save
        first_of_nth = 2 * nth - 1

        async def async_save(self, *args, **kwargs):
            futures = await original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == first_of_nth:
                _kill()
            return futures

        standard_checkpoint_handler.StandardCheckpointHandler.async_save = async_save
    elif point == "data":
        original_save = grain.checkpoint.CheckpointHandler.save

        def save(self, directory, item=None, args=None):
            if not hit():
                return original_save(self, directory, item, args)
            state = json.dumps((item or args.item).get_state(), indent=4)
            (Path(directory) / "process_0-of-1.json").write_text(state[: len(state) // 2])
            _kill()

        grain.checkpoint.CheckpointHandler.save = save
    elif point == "between":
        original_commit = atomicity.on_commit_callback

        async def on_commit_callback(*args, **kwargs):
            if hit():
                _kill()
            return await original_commit(*args, **kwargs)

        atomicity.on_commit_callback = on_commit_callback
    elif point == "cleanup":
        original_delete = deleter.StandardCheckpointDeleter.delete_steps

        def delete_steps(self, steps):
            # Called after every commit; the first one from the nth save on that deletes a step.
            calls["n"] += 1
            if steps and calls["n"] >= nth:
                _kill()
            return original_delete(self, steps)

        deleter.StandardCheckpointDeleter.delete_steps = delete_steps
    else:
        raise SystemExit(f"unknown kill point {point!r}; one of {POINTS}")


def child(point: str, nth: int, train_args: list[str]) -> int:
    _install(point, nth)
    from speechlm_jax.train import main

    return main.main(train_args)


# --- the parent


def _train_args(workdir: Path, corpus: Path, cache: Path, steps: int) -> list[str]:
    return [
        f"--config={REPO}/configs/asr.py:tiny,data_dir={corpus}",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.checkpoint.every=2",
        "--config.checkpoint.keep=2",
        "--config.checkpoint.async_save=True",
        "--config.optimizer.schedule=constant",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress_bar=False",
        "--config.train.fast_compile=True",
        f"--config.train.compilation_cache={cache}",
    ]


def _env() -> dict[str, str]:
    """The caller's environment and XLA flags, on one CPU device."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    flags.append("--xla_force_host_platform_device_count=1")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), PYTHONPATH=str(REPO))


def _run(args: list[str], point: str | None = None, nth: int = 0) -> subprocess.CompletedProcess:
    if point is None:
        command = [sys.executable, "-m", "speechlm_jax.train.main", *args]
    else:
        command = [sys.executable, __file__, "--child", f"{point}:{nth}", "--", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def _records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


def _complete_steps(workdir: Path) -> list[int]:
    """The checkpoints a restart can use (orbax's own reading, which skips uncommitted ones)."""
    import orbax.checkpoint as ocp

    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _final_state(workdir: Path, step: int) -> dict[str, np.ndarray | str]:
    """The arrays of the step's trainable and opt_state items, and its data-iterator state file."""
    import jax
    import orbax.checkpoint as ocp

    state: dict[str, np.ndarray | str] = {}
    with ocp.StandardCheckpointer() as reader:
        for item in ("trainable", "opt_state"):
            tree = reader.restore(workdir / "checkpoints" / str(step) / item)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                state[f"{item}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    for file in sorted((workdir / "checkpoints" / str(step) / "data").glob("*.json")):
        state[f"data/{file.name}"] = file.read_text()
    return state


def _differences(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"other items: {sorted(a.keys() ^ b.keys())[:4]}"]
    out = []
    for key in a:
        same = a[key] == b[key] if isinstance(a[key], str) else np.array_equal(a[key], b[key])
        if not same:
            out.append(key)
    return out


def _kill_at_random(args: list[str], workdir: Path, rng: random.Random, steps: int) -> int:
    """Starts the trainer and SIGKILLs it a random moment after a random step; returns that step."""
    after = rng.randint(1, steps - 1)
    process = subprocess.Popen(
        [sys.executable, "-m", "speechlm_jax.train.main", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None:
        if any(r["step"] >= after for r in _records(workdir)):
            time.sleep(rng.uniform(0.0, 0.5))
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return after


def check_kill(
    name: str, kill: subprocess.CompletedProcess | None, args: list[str], workdir: Path, reference: dict, steps: int
) -> dict:
    """Restarts the killed run and compares it with the uninterrupted one."""
    result: dict = {"kill_point": name}
    if kill is not None and kill.returncode != -signal.SIGKILL:
        result.update(ok=False, why=f"the seam was never reached (exit {kill.returncode}): {kill.stderr[-400:]}")
        return result
    complete = _complete_steps(workdir)
    killed_records = len(_records(workdir))
    restart = _run(args)
    resumed = re.search(r"resumed from step (\d+)", restart.stderr)
    result.update(
        complete_checkpoints=complete,
        resumed_from=int(resumed[1]) if resumed else 0,
        restart_exit=restart.returncode,
    )
    problems = []
    if restart.returncode != 0:
        problems.append(f"restart exited {restart.returncode}: {restart.stderr.strip().splitlines()[-1:]}")
    else:
        if result["resumed_from"] != (complete[-1] if complete else 0):
            problems.append(f"resumed from {result['resumed_from']}, the last complete checkpoint is {complete}")
        expected = {r["step"]: r for r in reference["records"]}
        for record in _records(workdir)[killed_records:]:
            ref = expected[record["step"]]
            keys = ["loss"] + [k for k in ref if k.startswith("data/")]
            if any(record.get(k) != ref[k] for k in keys):
                problems.append(f"step {record['step']} logs other values than the uninterrupted run")
                break
        differing = _differences(_final_state(workdir, steps), reference["state"])
        if differing:
            problems.append(f"final state differs in {differing[:4]}")
    result.update(ok=not problems, why="; ".join(problems))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, some of {POINTS}")
    parser.add_argument("--save", type=int, default=2, help="kill at this checkpoint save (1-based)")
    parser.add_argument("--random", type=int, default=4, help="kills at random moments")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, help="the tiny corpus (default: built in a temporary folder)")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    points = [p for p in args.points.split(",") if p]
    unknown = sorted(set(points) - set(POINTS))
    if unknown:
        parser.error(f"unknown kill points {unknown}; some of {POINTS}")
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_injection_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    if corpus is None:
        from speechlm_jax.toyworld.corpus import build_tiny_corpus

        corpus = build_tiny_corpus(work / "corpus", train_sentences=12, heldout_sentences=4)
    cache = work / "xla_cache"

    started = time.time()
    ref_dir = work / "reference"
    ref = _run(_train_args(ref_dir, corpus, cache, args.steps))
    if ref.returncode != 0:
        print(f"the uninterrupted run failed: {ref.stderr[-2000:]}", file=sys.stderr)
        return 1
    reference = {"records": _records(ref_dir), "state": _final_state(ref_dir, args.steps)}

    results = []
    for point in points:
        workdir = work / point
        train_args = _train_args(workdir, corpus, cache, args.steps)
        results.append(
            check_kill(point, _run(train_args, point, args.save), train_args, workdir, reference, args.steps)
        )
        print(json.dumps(results[-1]), flush=True)
    rng = random.Random(args.seed)
    for i in range(args.random):
        workdir = work / f"random_{i}"
        train_args = _train_args(workdir, corpus, cache, args.steps)
        after = _kill_at_random(train_args, workdir, rng, args.steps)
        results.append(check_kill(f"random after step {after}", None, train_args, workdir, reference, args.steps))
        print(json.dumps(results[-1]), flush=True)
    passed = sum(r["ok"] for r in results)
    summary = {"kill_points": len(results), "passed": passed, "seconds": round(time.time() - started, 1)}
    print(json.dumps(summary), flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        point, nth = sys.argv[2].split(":")
        rest = sys.argv[sys.argv.index("--") + 1 :]
        sys.exit(child(point, int(nth), rest))
    sys.exit(main())
