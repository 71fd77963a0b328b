"""`speechlm-convert`: a trained run out to Hugging Face, and an HF folder back in as a run.

    speechlm-convert export --workdir RUN [--step N] --out HF_DIR [--merge-lora] [--dtype bf16|fp32]
                            [--llm-only] [--max-shard-size 5GB]
    speechlm-convert import --hf HF_DIR --workdir RUN [--config configs/<recipe>.py:<variant>]

`export` writes `VoxtralForConditionalGeneration` (or, with `--llm-only`, the LLM's
`*ForCausalLM`); without `--merge-lora` the LLM's adapters go to `HF_DIR/adapter` as a PEFT
adapter onto that model. `import` reads such a Voxtral folder (and its `adapter/`) into a
trainer workdir; `--config` names the recipe the run will train with (its data, loss and
optimiser are kept, the model becomes the imported one). A model no transformers class represents,
or tensors that do not fit the config, fail with the reason in one line and leave no output behind
(exit status 2; 1 is an internal error).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from speechlm_jax import cli
from speechlm_jax.convert import export, voxtral, workdir
from speechlm_jax.train import config as config_lib
from speechlm_jax.train.checkpoint import BaseMismatchError

PROG = "speechlm-convert"
# Inputs that cannot be converted: reported in one line, exit status 2.
USER_ERRORS = (voxtral.NotRepresentableError, ValueError, FileExistsError, BaseMismatchError)


def parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="a trainer workdir -> an HF folder (transformers class, no remote code)")
    out.add_argument("--workdir", required=True, help="the run's workdir (config.json + checkpoints/)")
    out.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    out.add_argument("--out", required=True, help="the HF folder to create (must not exist)")
    out.add_argument(
        "--merge-lora", action="store_true", help="fold LoRA into the weights instead of writing a PEFT adapter"
    )
    out.add_argument("--dtype", choices=sorted(export.DTYPES), default="fp32", help="tensor dtype of the export")
    out.add_argument("--llm-only", action="store_true", help="export only the LLM, as its *ForCausalLM")
    out.add_argument(
        "--max-shard-size", default=export.DEFAULT_SHARD_SIZE, help="largest safetensors shard (e.g. 5GB, 500MB)"
    )
    into = commands.add_parser("import", help="a Voxtral HF folder (+ adapter/) -> a new trainer workdir")
    into.add_argument("--hf", required=True, help="the VoxtralForConditionalGeneration folder")
    into.add_argument("--workdir", required=True, help="the workdir to create (must not exist)")
    into.add_argument(
        "--config",
        default=None,
        help="recipe to train with, as speechlm-train takes it (configs/asr.py:tiny,data_dir=...)",
    )
    return parser


def run(argv: Sequence[str]) -> str:
    """Runs one command; returns the folder it wrote."""
    args = parser().parse_args(list(argv))
    if args.command == "import":
        recipe = config_lib.load_config_file(args.config) if args.config else None
        return str(workdir.import_hf(args.hf, args.workdir, recipe=recipe))
    loaded = workdir.load_workdir(args.workdir, args.step)
    common = dict(
        tokenizer_dir=loaded.tokenizer_dir,
        merge_lora=args.merge_lora,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
    )
    if args.llm_only:
        return str(export.export_llm(loaded.model.llm, args.out, **common))
    return str(export.export_speechlm(loaded.model, args.out, audio_token_id=loaded.audio_token_id, **common))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`speechlm-convert`); prints the folder written, returns the exit status."""
    return cli.run_command(PROG, lambda: print(run(sys.argv[1:] if argv is None else argv)), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
