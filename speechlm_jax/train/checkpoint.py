"""Checkpoints of a run: what a restart needs to continue exactly where it stopped.

An orbax `CheckpointManager` (async, keep N, save interval) under `<workdir>/checkpoints`
holds, per saved step, a composite of

    trainable   the trainable parameters (projector, LoRA, ...), restored with the target
                shardings, so a run may resume on another mesh
    opt_state   the optimiser state (only the trainable groups have one)
    meta        JSON: step, rng key data, the frozen base's path and content hash
    data        the Grain iterator state (grain's own checkpoint handler), so the data
                continues with the batch that follows the saved step

The frozen base is not saved: it is rebuilt from its source (HF folder or seed) and its
content hash is checked against the one recorded, so a resume onto different base weights
fails loudly instead of training an adapter for the wrong model. The hash reads a strided
sample of every leaf (plus paths, shapes and dtypes): cheap for a 7B model, and any real
change of weights changes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from speechlm_jax import storage

HASH_SAMPLES = 4096


class BaseMismatchError(RuntimeError):
    """The frozen base of a resumed run differs from the one its checkpoint was trained on."""


class CheckpointMismatchError(ValueError):
    """A stored item's tensors are not those the config builds (a checkpoint of another shape)."""


def leaf_name(path: Sequence[Any]) -> str:
    """The name ("projector/linear_1/kernel") of a pytree key path of a state or of orbax's metadata tree."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(n for n in names if n != "value")


def leaf_shapes(tree: object) -> dict[str, tuple[int, ...]]:
    """{"projector/linear_1/kernel": shape} of a state or of orbax's stored metadata tree."""
    return {leaf_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(item_dir: storage.PathLike, tree: Any, *, context: str) -> None:
    """Raises CheckpointMismatchError unless the item stored in `item_dir` has `tree`'s tensors and shapes.

    Orbax would otherwise fail deep in tensorstore naming no tensor, or (with `strict=False`)
    pad and truncate. `context` says what the config is ("the workdir's config.json").
    """
    stored = leaf_shapes(ocp.StandardCheckpointer().metadata(item_dir).item_metadata)
    expected = leaf_shapes(tree)
    mismatched = [
        f"{k}: stored {stored[k]}, config builds {expected[k]}"
        for k in sorted(stored.keys() & expected.keys())
        if stored[k] != expected[k]
    ]
    missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    if mismatched or missing or unexpected:
        problems = [f"first mismatched tensor {mismatched[0]} ({len(mismatched)} in all)"] if mismatched else []
        problems += [f"missing {missing[:5]}"] if missing else []
        problems += [f"not in the config's model {unexpected[:5]}"] if unexpected else []
        hint = _layer_form_hint(missing, unexpected)
        problems += [hint] if hint else []
        raise CheckpointMismatchError(f"the checkpoint {item_dir} does not fit {context}: " + "; ".join(problems))


def _layer_form_hint(missing: list[str], unexpected: list[str]) -> str:
    """Names model.scan_layers when one side has per-layer paths (`layers/3/...`) and the other stacked ones."""
    per_layer = re.compile(r"(^|/)layers/\d+/")
    stacked = re.compile(r"(^|/)layers/(?!\d+/)")
    # `unexpected` paths are the checkpoint's, `missing` ones the config's.
    if any(per_layer.search(k) for k in unexpected) and any(stacked.search(k) for k in missing):
        return "its layers are unrolled, the config's scanned: restore it with model.scan_layers=false"
    if any(stacked.search(k) for k in unexpected) and any(per_layer.search(k) for k in missing):
        return "its layers are scanned, the config's unrolled: restore it with model.scan_layers=true"
    return ""


def base_hash(frozen: Any) -> str:
    """sha256 over paths, shapes, dtypes and a strided sample of every leaf of the frozen state."""
    leaves = jax.tree_util.tree_flatten_with_path(frozen)[0]

    def sample(x: jax.Array) -> jax.Array:
        flat = x.reshape(-1)
        stride = max(flat.size // HASH_SAMPLES, 1)
        return flat[::stride][:HASH_SAMPLES]

    samples = jax.device_get(jax.jit(lambda xs: [sample(x) for x in xs])([x for _, x in leaves]))
    digest = hashlib.sha256()
    for (path, leaf), values in zip(leaves, samples):
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|".encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _absolute(folder: epath.Path) -> epath.Path:
    return folder if storage.is_remote(folder) else epath.Path(folder.absolute())


class Checkpointer:
    """Saves and restores (trainable, opt_state, meta, data iterator) under `<workdir>/checkpoints`."""

    def __init__(
        self,
        workdir: storage.PathLike,
        *,
        every: int,
        keep: int,
        async_save: bool = True,
        keep_steps: Sequence[int] = (),
    ):
        """`keep` latest checkpoints, plus those of `keep_steps` (saved when reached, never deleted)."""
        # Local or in an object store (orbax's own commit protocol there: no renames assumed).
        self.directory = _absolute(storage.path(workdir)) / "checkpoints"
        self.every = every
        self.keep_steps = frozenset(int(s) for s in keep_steps)
        policy = ocp.checkpoint_managers.LatestN(n=keep)
        if self.keep_steps:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [policy, ocp.checkpoint_managers.CustomSteps(sorted(self.keep_steps))]
            )
        # `create=False`: opening a workdir writes nothing; the first save makes the folder.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=False
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("trainable", "opt_state", "meta", "data"),
            item_handlers={"data": grain.checkpoint.CheckpointHandler()},
            options=options,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `step` is on the save interval (the trainer also saves at the end and on SIGTERM).

        `every` 0 saves only there and at `keep_steps`."""
        return step in self.keep_steps or (bool(self.every) and step % self.every == 0)

    def check_fits(self, step: int, trainable: Any, opt_state: Any, context: str) -> None:
        """Raises CheckpointMismatchError unless step `step`'s trainable and optimiser items fit these trees."""
        for name, tree in (("trainable", trainable), ("opt_state", opt_state)):
            check_fits(self.directory / str(step) / name, tree, context=context)

    def save(self, step: int, trainable: Any, opt_state: Any, meta: dict[str, Any], data_iterator: Any) -> bool:
        """Starts saving step `step` (async); returns whether a save was started (not when it exists)."""
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(meta, step=step)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, trainable: Any, opt_state: Any, data_iterator: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restores step `step` onto the shardings of the given (abstract or concrete) trees.

        `data_iterator` is restored in place. A step without a data item (one written by
        `speechlm-convert import` without a recipe) leaves the iterator at its start.
        Returns (trainable, opt_state, meta).
        """
        items = dict(
            trainable=ocp.args.StandardRestore(abstract_like(trainable)),
            opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
            meta=ocp.args.JsonRestore(),
        )
        if (self.directory / str(step) / "data").exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        args = ocp.args.Composite(**items)
        restored = self.manager.restore(step, args=args)
        return restored.trainable, restored.opt_state, dict(restored.meta)

    def wait(self) -> None:
        """Blocks until the async saves in flight are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def rng_to_meta(rng: jax.Array) -> list[int]:
    """A PRNG key as JSON-able uint32 words."""
    return np.asarray(jax.random.key_data(rng)).astype(np.uint32).ravel().tolist()


def rng_from_meta(words: list[int], like: jax.Array) -> jax.Array:
    data = np.asarray(words, np.uint32).reshape(jax.random.key_data(like).shape)
    return jax.random.wrap_key_data(jnp.asarray(data), impl=jax.random.key_impl(like))


def check_base(meta: dict[str, Any], expected_hash: str, expected_path: str) -> None:
    """Raises BaseMismatchError when the frozen base differs from the checkpoint's."""
    if meta.get("base_hash") != expected_hash:
        raise BaseMismatchError(
            f"the frozen base weights differ from those the checkpoint at step {meta.get('step')} was trained on "
            f"(checkpoint: {meta.get('base_path')!r} hash {str(meta.get('base_hash'))[:12]}; now: {expected_path!r} "
            f"hash {expected_hash[:12]}); use the original base or a fresh workdir"
        )
