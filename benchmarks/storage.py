"""Orbax checkpoint save and restore time of a recipe's training state, and the data pipeline's
examples/s reading its manifest and audio, on local disk and on a Cloud Storage emulator; prints
one JSON line last.

    python -m benchmarks.storage                                  # configs/asr.py:tiny
    python -m benchmarks.storage --config configs/asr.py:tiny --repeats 5

(from the repository root). The state is the config's trainable parameters and optimiser state
with the shapes, dtypes and shardings `train.state.build_state` gives them (random values: the
model is not built), saved as `train.checkpoint` saves a step: an async `CheckpointManager` with
the items trainable, opt_state (orbax's standard handler: tensorstore, OCDBT), meta (JSON) and
data (a Grain iterator). `save_s` runs from `save` until the step is committed, `restore_s` restores
it onto the abstract state; each is the best of `--repeats` steps. The emulator is
tools/gcs_emulator.py, started here on a free loopback port: its figures measure the clients'
request pattern over loopback HTTP, not Cloud Storage's latency or bandwidth.

The pipeline part builds the toy world's tiny corpus (eSpeak NG speech, --utterances sentences,
cached under the system's temporary folder), uploads it to the bucket, and times `--batches`
batches of the asr pipeline (decode, tokenize, bucket, batch; two threads) reading the local
manifest and then the bucket's: `pipeline.*.examples_per_s`, after two warm-up batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMULATOR = REPO / "tools" / "gcs_emulator.py"
DEFAULT_CONFIG = f"{REPO}/configs/asr.py:tiny"


def start_emulator() -> tuple[subprocess.Popen, str]:
    """tools/gcs_emulator.py on a free port: (the process, its URL)."""
    process = subprocess.Popen([sys.executable, str(EMULATOR), "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("gcs-emulator listening on "):
        process.kill()
        raise RuntimeError(f"the Cloud Storage emulator did not start: {line!r}")
    return process, line.split()[-1]


def _tool():
    spec = importlib.util.spec_from_file_location("gcs_emulator_tool", EMULATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def client_env(url: str) -> dict[str, str]:
    return _tool().client_env(url)


def create_bucket(url: str) -> str:
    return _tool().create_bucket(url, prefix="bench")


def training_state(config):
    """(trainable, opt_state) of `config` with random values, in their shardings, and their abstract forms."""
    import jax
    import numpy as np

    from speechlm_jax.sharding import make_mesh
    from speechlm_jax.train import state as state_lib

    mesh = make_mesh(dict(config.mesh))
    abstract = state_lib.build_state(config, mesh, abstract=True, for_training=True)
    rng = np.random.default_rng(0)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            values = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        else:
            values = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(values, leaf.sharding)

    trainable, opt_state = jax.tree.map(fill, (abstract.trainable, abstract.opt_state))
    return trainable, opt_state, abstract.trainable, abstract.opt_state


def time_checkpoints(directory, trainable, opt_state, abstract_trainable, abstract_opt, repeats: int) -> dict:
    import grain
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from speechlm_jax import storage

    dataset = grain.MapDataset.range(1000).shuffle(seed=0).batch(8).to_iter_dataset()
    iterator = iter(dataset)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True, create=False)
    manager = ocp.CheckpointManager(
        storage.path(directory),
        item_names=("trainable", "opt_state", "meta", "data"),
        item_handlers={"data": grain.checkpoint.CheckpointHandler()},
        options=options,
    )
    saves, restores = [], []
    for step in range(1, repeats + 1):
        next(iterator)
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": step}),
            data=grain.checkpoint.CheckpointSave(iterator),
        )
        start = time.perf_counter()
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        saves.append(time.perf_counter() - start)

        restored_iterator = iter(dataset)
        args = ocp.args.Composite(
            trainable=ocp.args.StandardRestore(abstract_trainable),
            opt_state=ocp.args.StandardRestore(abstract_opt),
            meta=ocp.args.JsonRestore(),
            data=grain.checkpoint.CheckpointRestore(restored_iterator),
        )
        start = time.perf_counter()
        restored = manager.restore(step, args=args)
        jax.block_until_ready((restored.trainable, restored.opt_state))
        restores.append(time.perf_counter() - start)
        assert restored.meta["step"] == step
        for a, b in zip(jax.tree.leaves(restored.trainable), jax.tree.leaves(trainable)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert manager.latest_step() == repeats
    manager.close()
    return {"save_s": min(saves), "restore_s": min(restores)}


def tiny_corpus(utterances: int) -> Path:
    from speechlm_jax.toyworld.corpus import build_tiny_corpus

    folder = Path(tempfile.gettempdir()) / f"speechlm_storage_bench_corpus_{utterances}"
    if not (folder / "train" / "manifest.jsonl").exists():
        build_tiny_corpus(folder, train_sentences=utterances, heldout_sentences=2)
    return folder


def time_pipeline(data_dir: str, batches: int, batch_size: int) -> dict:
    """examples/s of the asr pipeline over `data_dir`'s train manifest (local or in a bucket)."""
    from speechlm_jax.data.config import PipelineConfig
    from speechlm_jax.data.pipeline import build_pipeline
    from speechlm_jax.data.tokenizer import load_tokenizer

    config = PipelineConfig(
        speech_sources=({"type": "manifest", "path": f"{data_dir}/train/manifest.jsonl"},),
        kinds={"asr": 1.0},
        buckets=((16000 * 8, 96),),
        teacher_tokens=96,
        batch_size=batch_size,
        downsample=4,
        num_threads=2,
        prefetch_buffer_size=2 * batch_size,
    )
    iterator, _ = build_pipeline(config, tokenizer=load_tokenizer(f"{data_dir}/tokenizer"), split="train", seed=0)
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    examples = sum(int(next(iterator)["weight"].sum()) for _ in range(batches))
    return {"examples_per_s": round(examples / (time.perf_counter() - start), 2), "examples": examples}


def quiet_reads() -> None:
    """The pipelines' read-ahead threads outlive the timing; once the emulator stops, their reads
    fail and would be logged as skips. Nothing timed is affected."""
    import logging

    logging.getLogger("speechlm_jax").setLevel(logging.CRITICAL)
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    logging.getLogger("fsspec").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.startswith("--config") for arg in argv):
        argv = [f"--config={DEFAULT_CONFIG}", *argv]
    process, url = start_emulator()
    try:
        # Before fsspec, gcsfs and tensorstore are imported: some of them read these only then.
        os.environ.update(client_env(url))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import numpy as np

        from speechlm_jax import storage
        from speechlm_jax.train import config as config_lib

        parser = argparse.ArgumentParser(prog="benchmarks.storage", description=__doc__.split("\n\n")[0])
        config_lib.add_config_argument(parser)
        parser.add_argument("--repeats", type=int, default=3, help="steps saved and restored (best time each)")
        parser.add_argument("--utterances", type=int, default=48, help="sentences of the pipeline's corpus")
        parser.add_argument("--batches", type=int, default=12, help="pipeline batches timed")
        parser.add_argument("--batch_size", type=int, default=8)
        args, config = config_lib.parse_command_line(parser, argv)

        trainable, opt_state, abstract_trainable, abstract_opt = training_state(config)
        leaves = jax.tree.leaves((trainable, opt_state))
        result = {
            "config": os.path.relpath(args.config, REPO) if args.config.startswith(str(REPO)) else args.config,
            "leaves": len(leaves),
            "trainable_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(trainable))),
            "opt_state_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(opt_state))),
            "repeats": args.repeats,
        }
        state = (trainable, opt_state, abstract_trainable, abstract_opt)
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as local:
            result["local"] = time_checkpoints(f"{local}/checkpoints", *state, args.repeats)
        result["gcs_emulator"] = time_checkpoints(f"{create_bucket(url)}/run/checkpoints", *state, args.repeats)
        result["gcs_over_local"] = {
            key: result["gcs_emulator"][key] / result["local"][key] for key in ("save_s", "restore_s")
        }
        corpus = tiny_corpus(args.utterances)
        bucket_corpus = storage.upload(corpus, f"{create_bucket(url)}/corpus")
        result["pipeline"] = {
            "local": time_pipeline(str(corpus), args.batches, args.batch_size),
            "gcs_emulator": time_pipeline(bucket_corpus, args.batches, args.batch_size),
        }
        quiet_reads()
        result["pipeline"]["gcs_over_local"] = (
            result["pipeline"]["gcs_emulator"]["examples_per_s"] / result["pipeline"]["local"]["examples_per_s"]
        )
    finally:
        process.terminate()
        process.wait(10)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
