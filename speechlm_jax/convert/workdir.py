"""Trainer workdirs <-> HF folders: the model of a run at a step (for export), and an HF folder as a run (import).

A trainer workdir (`speechlm_jax.train`) holds `config.json` (the resolved run config) and
orbax checkpoints of the *trainable* partition under `checkpoints/<step>/`; the frozen base
is not saved but rebuilt from `model.llm_weights` / `model.encoder_weights`, and its
content hash is recorded in the checkpoint's `meta`.

`load_workdir` rebuilds the SpeechLM of a run exactly as the trainer does (`train.state`),
restores only the `trainable` and `meta` items of the step, and checks the base hash (an
adapter exported onto different base weights would be a different model).

`import_hf` turns a `VoxtralForConditionalGeneration` folder (optionally with the PEFT
adapter `adapter/` that an unmerged export writes) into a workdir of the same form:

    base/llm/        the LLM as its *ForCausalLM folder, with the tokenizer (model.llm, llm_weights, data.tokenizer)
    base/encoder/    the Whisper encoder as a WhisperModel-layout folder (model.encoder, encoder_weights)
    config.json      the recipe given (or `configs/base.py` with float32 weights) with the imported
                     model: its base folders, projector, LoRA; trainable groups: the recipe's,
                     or projector (+ lora with an adapter)
    checkpoints/0/   trainable (projector + adapters), opt_state (fresh), meta (step 0, base hash),
                     and, when the recipe names speech data, data (the Grain iterator at its start):
                     every item the trainer's own checkpoints have

so `load_workdir` (and therefore `speechlm-convert export --workdir`) reads it back and the
export is bitwise the imported tensors, and the trainer's `Checkpointer.restore` takes the step.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from speechlm_jax import storage
from speechlm_jax.configs.base import base_config
from speechlm_jax.convert import export, peft_adapter, voxtral
from speechlm_jax.data.tokenizer import load_tokenizer
from speechlm_jax.models.hf_import import LLM_IGNORED, SafetensorsCheckpoint, load_state, read_hf_config
from speechlm_jax.models.speechlm import SpeechLM, build_speechlm
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import checkpoint, data, restore
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import state as state_lib

IMPORTED_STEP = 0


@dataclasses.dataclass
class Run:
    """A run's model at one step, with what export needs besides the weights."""

    model: SpeechLM
    config: ml_collections.ConfigDict
    step: int
    tokenizer_dir: str
    audio_token_id: int


def load_workdir(workdir: str | Path, step: int | None = None) -> Run:
    """The SpeechLM of a trainer workdir at `step` (default: the latest checkpoint), on one device.

    Raises FileNotFoundError without a checkpoint, ValueError when its tensors do not fit the
    config, and `checkpoint.BaseMismatchError` when the base weights the config names are not
    those the checkpoint was trained on (see `train.restore`).
    """
    model, config, step = restore.load_model(workdir, step=step)
    tokenizer_dir = config.data.tokenizer
    return Run(model, config, step, tokenizer_dir, load_tokenizer(tokenizer_dir).audio_token_id)


def load_voxtral(folder: str | Path) -> tuple[SpeechLM, int]:
    """(SpeechLM with float32 weights, audio_token_id) of a VoxtralForConditionalGeneration folder;
    a PEFT adapter in `folder/adapter` becomes the LLM's LoRA. A folder in an object store is
    copied to local disk first."""
    folder = storage.local_copy(folder)
    hf = read_hf_config(folder)
    if hf.get("model_type") != "voxtral":
        raise ValueError(
            f"{folder} holds a {hf.get('model_type')!r} model, not VoxtralForConditionalGeneration; an LLM folder "
            "(*ForCausalLM) needs no import: name it as model.llm and model.llm_weights of a run"
        )
    encoder_cfg, projector_cfg, llm_cfg = voxtral.configs_from_hf(hf)
    ckpt = SafetensorsCheckpoint(folder)
    ignore = tuple(f"language_model\\.{p}" for p in LLM_IGNORED)
    if llm_cfg.tie_word_embeddings and voxtral.LM_HEAD_KEY in ckpt.keys():
        # Voxtral always stores an lm_head; it is the tied embedding only if it equals it.
        if np.array_equal(ckpt.get(voxtral.LM_HEAD_KEY), ckpt.get(voxtral.EMBED_KEY)):
            ignore += (re.escape(voxtral.LM_HEAD_KEY),)
        else:
            llm_cfg = dataclasses.replace(llm_cfg, tie_word_embeddings=False)
    abstract = nnx.eval_shape(lambda: build_speechlm(encoder_cfg, projector_cfg, llm_cfg, None, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    model = nnx.merge(graphdef, load_state(abstract_state, voxtral.table(llm_cfg), ckpt, ignore=ignore))
    if (folder / export.ADAPTER_DIR).is_dir():
        peft_adapter.read_adapter(
            folder / export.ADAPTER_DIR, model.llm, module_name=voxtral.in_memory_module, rngs=nnx.Rngs(0)
        )
    return model, int(hf["audio_token_id"])


def run_config(
    model: SpeechLM, workdir: Path, recipe: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The run config of an imported `model` whose base folders live under `workdir/base`.

    `recipe` (a training config: data, loss, optimiser) is kept except for the model and the
    tokenizer; without one, `configs/base.py` with float32 weights and nothing but the
    projector (and the imported adapters) training.
    """
    config = ml_collections.ConfigDict((recipe or base_config()).to_dict())
    llm_dir, encoder_dir = str(workdir / "base" / "llm"), str(workdir / "base" / "encoder")
    for key, value in (
        ("llm", llm_dir),
        ("llm_weights", llm_dir),
        ("encoder", encoder_dir),
        ("encoder_weights", encoder_dir),
    ):
        del config.model[key]  # a recipe may hold a dict of HF fields here; the field changes type
        config.model[key] = value
    config.data.tokenizer = llm_dir
    projector = model.projector
    config.model.projector.update(
        kind="frame_stack",
        downsample=projector.stack,
        hidden=0,
        activation=voxtral.activation_name(projector),
        use_bias=False,
        width=0,
    )
    groups = list(config_lib.trainable_groups(config)) if recipe is not None else ["projector"]
    if recipe is None:
        for name in ("dtype", "param_dtype", "frozen_dtype"):
            config.model[name] = "float32"
        config.model.lora.rank = 0
    adapted = peft_adapter.adapted_linears(model.llm)
    if adapted:
        rank, alpha = peft_adapter.rank_and_alpha(adapted)
        config.model.lora.update(
            rank=rank, alpha=alpha, targets="^(" + "|".join(re.escape(path) for path, _ in adapted) + ")$"
        )
        groups += [] if "lora" in groups else ["lora"]
    config.train.trainable = ",".join(groups)
    return config


def _with_root(config: ml_collections.ConfigDict, old: Path, new: Path) -> ml_collections.ConfigDict:
    """A copy of `config` whose base paths under `old` point under `new` instead."""
    moved = ml_collections.ConfigDict(config.to_dict())
    for key in ("llm", "llm_weights", "encoder", "encoder_weights"):
        moved.model[key] = str(new / Path(config.model[key]).relative_to(old))
    moved.data.tokenizer = moved.model.llm
    return moved


def write_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: Path,
    *,
    source: SpeechLM | None = None,
    base_path: str | None = None,
    step: int = IMPORTED_STEP,
    data_iterator: Any = None,
) -> None:
    """Saves step `step` of the run `config` describes into `workdir/checkpoints`, as the trainer would.

    The model is rebuilt from `config` (its base weights read from the folders it names); each
    trainable parameter takes `source`'s value where `source` has it (else the config's
    initialisation, e.g. fresh adapters of a recipe), the optimiser state is fresh, and `meta`
    records the base hash the trainer and `load_workdir` check (`base_path` describes the
    base; default: the config's). With `data_iterator` (the run's Grain iterator) the step
    is complete, as the trainer's own saves are.
    """
    state = state_lib.build_state(config, make_mesh({"data": 1}, jax.devices()[:1]))
    trainable = state.trainable
    if source is not None:
        imported = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
        flat = []
        for path, variable in nnx.to_flat_state(trainable):
            fresh = variable.get_value()
            if path in imported:
                variable = variable.replace(
                    jax.device_put(np.asarray(imported[path].get_value(), fresh.dtype), fresh.sharding)
                )
            flat.append((path, variable))
        trainable = nnx.from_flat_state(flat)
    meta = {
        "base_hash": checkpoint.base_hash(state.frozen),
        "base_path": base_path or restore.base_path(config),
        "rng": checkpoint.rng_to_meta(jax.random.key(config.seed)),
        "step": step,
    }
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=config.checkpoint.keep, async_save=False)
    if data_iterator is not None:
        ckpt.save(step, trainable, state.tx.init(trainable), meta, data_iterator)
    else:
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(state.tx.init(trainable)),
            meta=ocp.args.JsonSave(meta),
        )
        ckpt.manager.save(step, args=args, force=True)
    ckpt.close()


def import_hf(hf_dir: str | Path, workdir: str | Path, *, recipe: ml_collections.ConfigDict | None = None) -> Path:
    """Writes the Voxtral folder `hf_dir` as a new trainer workdir (see the module docstring); returns it.

    With a `recipe` that names speech data, the step also holds the data iterator at its
    start, so it has every item a trainer checkpoint has.
    """
    if storage.is_remote(workdir):
        # The workdir is staged and renamed into place, and its orbax step is finalised by a local
        # rename; on a store orbax finalises with its own commit files, so it must write there itself.
        raise storage.UnsupportedPath(
            f"--workdir {workdir}: import writes a new local workdir (staged, then renamed into place); "
            "import into a local or mounted folder"
        )
    hf_dir, workdir = storage.local_copy(hf_dir), Path(workdir).absolute()
    model, _ = load_voxtral(hf_dir)
    voxtral.check_representable(model)
    config = run_config(model, workdir, recipe)
    with export.staged_folder(workdir) as staging:
        (staging / "base" / "encoder").mkdir(parents=True)
        export.write_whisper_encoder(model.encoder, staging / "base" / "encoder")
        export.export_llm(model.llm, staging / "base" / "llm", tokenizer_dir=hf_dir, keep_adapter=False)
        config_lib.write_resolved(config, staging)
        # The checkpoint is built from the staged base folders; its meta names the final ones.
        staged = _with_root(config, workdir, staging)
        iterator = data.Data(staged).train_iterator()[0] if recipe is not None and staged.data.speech_sources else None
        write_checkpoint(staged, staging, source=model, base_path=restore.base_path(config), data_iterator=iterator)
    return workdir
