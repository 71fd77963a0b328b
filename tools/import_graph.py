"""The package's import graph between its layers, and the imports that run upward.

    python tools/import_graph.py            # every import between layers, upward ones flagged
    python tools/import_graph.py --check    # exit status 1 if any import runs upward

The layers, lowest first (a module may import its own layer and any below it, never above):

    ground      sharding, distributed, losses, cli, storage, stages (the resumable-stage cache)
    models      encoders, front end, projectors, decoder LLMs, LoRA, SpeechLM, HF import
    data        sources, tasks, examples, interleaving, batching, TTS
    generate    batched KV-cache decoding
    toyworld    the toy world: vocabulary, sentences, tasks, corpora (a task module like any other)
    train       state, step, loop, checkpoints, metrics, AOT compile
    evaluation  gap, generalisation, retention, diagnostics, WER, teacher targets
    configs     the recipe configs (they name toy-world tasks; conversion reads the base config)
    convert     export to transformers classes, import into a workdir
    selection   SALAD stage 2
    demo        `make demo`: a client of everything

Only imports at module level and inside functions alike are read (both are dependencies);
imports under `if TYPE_CHECKING:` are read too, so annotations cannot hide a cycle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "speechlm_jax"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("sharding", "distributed", "losses", "cli", "storage", "stages"),
    ("models",),
    ("data",),
    ("generate",),
    ("toyworld",),
    ("train",),
    ("evaluation",),
    ("configs",),
    ("convert",),
    ("selection",),
    ("demo",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> set[str]:
    """The `speechlm_jax.*` modules a file imports (relative imports resolved)."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from speechlm_jax import losses` imports the submodule `speechlm_jax.losses`.
            if target == PACKAGE:
                found.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
    return {t for t in found if t.startswith(f"{PACKAGE}.")}


def layer(module: str) -> str | None:
    """The layer of `speechlm_jax.<top>...` (None for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def edges(root: Path) -> list[tuple[str, str, bool]]:
    """(importer, imported, upward) for every import between two different layers, sorted."""
    out = set()
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        for target in imports(path, root):
            a, b = layer(source), layer(target)
            if a is None or b is None or a == b:
                continue
            for name in (a, b):
                if name not in RANK:
                    raise SystemExit(f"{name!r} ({source} -> {target}) is in no layer; add it to LAYERS")
            out.add((source, target, RANK[b] > RANK[a]))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / PACKAGE))
    parser.add_argument("--check", action="store_true", help="print only the upward imports; exit 1 if any")
    args = parser.parse_args(argv)
    found = edges(Path(args.root))
    upward = [e for e in found if e[2]]
    for source, target, up in upward if args.check else found:
        print(f"{'UPWARD ' if up else '       '}{source} -> {target}")
    print(f"{len(found)} imports between layers, {len(upward)} upward", file=sys.stderr)
    return 1 if upward else 0


if __name__ == "__main__":
    sys.exit(main())
